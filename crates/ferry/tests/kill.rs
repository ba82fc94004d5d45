//! A destination *process* killed (SIGKILL, as a crash or the OOM killer would) at any phase
//! of a migration: the handshake, the bulk round, later rounds, the final round, the state,
//! Complete, the acknowledgement. The source, ferry's engine with a simulated guest in this
//! process, must never report success unless the destination acknowledged first, must keep its
//! guest running when it fails (or wait paused when the acknowledgement may have been lost:
//! then no copy runs and the operator decides), and must end within its timeouts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migration::{BitmapDirtyLog, Connection, Migration, MigrationConfig, MigrationError};
use ferry_sim::{create_memory, Guest, HintBehavior, SimConfig, SimDriver, SimVm, Workload};

const MEMORY: u64 = 16 << 20;

/// Where the proxy kills the destination: after this many bytes in one direction.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    Never,
    Forward(u64),
    Backward(u64),
}

/// Copies `from` to `to`; once `counted` would pass `kill_after`, forwards up to it and kills
/// `pid`. Either side closing closes the other, as one connection would.
fn pump(
    mut from: UnixStream,
    mut to: UnixStream,
    counted: Arc<AtomicU64>,
    kill_after: Option<u64>,
    pid: i32,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let before = counted.fetch_add(n as u64, Ordering::SeqCst);
        let mut end = n;
        let mut kill = false;
        if let Some(at) = kill_after {
            if before + n as u64 > at && before <= at {
                end = (at - before) as usize;
                kill = true;
            }
        }
        if to.write_all(&buf[..end]).is_err() {
            break;
        }
        if kill {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            // The rest of what the source sent dies with the process.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

struct Run {
    result: Result<ferry_migration::MigrationStats, MigrationError>,
    source_paused: bool,
    bytes: [u64; 2],
    killed: bool,
    elapsed: Duration,
}

fn migrate_killing(dir: &std::path::Path, kill: KillAt) -> Run {
    let socket = dir.join(format!("dest-{kill:?}.sock").replace(['(', ')', ' '], "_"));
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["sim-receive", "--memory", "16M", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry sim-receive");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("LISTENING"), "{line:?}");
    let pid = child.id() as i32;

    let dest = UnixStream::connect(&socket).expect("connect to the destination");
    let (source_end, proxy_end) = UnixStream::pair().unwrap();
    let counted = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let (forward_kill, backward_kill) = match kill {
        KillAt::Never => (None, None),
        KillAt::Forward(at) => (Some(at), None),
        KillAt::Backward(at) => (None, Some(at)),
    };
    let pumps = [
        {
            let (from, to, c) = (
                proxy_end.try_clone().unwrap(),
                dest.try_clone().unwrap(),
                counted[0].clone(),
            );
            std::thread::spawn(move || pump(from, to, c, forward_kill, pid))
        },
        {
            let (from, to, c) = (dest, proxy_end, counted[1].clone());
            std::thread::spawn(move || pump(from, to, c, backward_kill, pid))
        },
    ];

    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(
        Guest::new(mem.clone(), 5),
        SimConfig {
            used_percent: 40,
            workload: Workload::Churn { pages_per_tick: 16 },
            hints: Some(HintBehavior::Honest { delay_ticks: 1 }),
            zero_on_alloc: true,
        },
    );
    for _ in 0..20 {
        vm.tick();
    }
    let config = MigrationConfig {
        handshake_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
        ..MigrationConfig::default()
    };
    let mut dirty = BitmapDirtyLog::lazy(mem.clone());
    let (mut control, mut driver) = (vm.clone(), SimDriver(vm.clone()));
    let mut hints = vm.hint_source();
    let started = Instant::now();
    let result = (|| {
        let mut m = Migration::new(&mem, &mut dirty, &mut control, &mut driver, config)?;
        if let Some(h) = hints.as_mut() {
            m.add_source(h);
        }
        m.run(vec![Connection::from_unix(source_end).unwrap()])
    })();
    let elapsed = started.elapsed();
    let status = child.wait().unwrap();
    for p in pumps {
        p.join().unwrap();
    }
    let source_paused = vm.lock().paused;
    Run {
        result,
        source_paused,
        bytes: [
            counted[0].load(Ordering::SeqCst),
            counted[1].load(Ordering::SeqCst),
        ],
        killed: std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
        elapsed,
    }
}

#[test]
fn a_destination_killed_at_any_phase_never_leaves_the_source_wrong() {
    let dir = std::env::temp_dir().join(format!("ferry-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clean = migrate_killing(&dir, KillAt::Never);
    assert!(clean.result.is_ok() && clean.source_paused && !clean.killed);
    let [forward, backward] = clean.bytes;
    assert!(forward > 1 << 20 && backward > 0, "{forward} {backward}");

    let mut points: Vec<KillAt> = (0..8).map(|i| KillAt::Forward(forward * i / 8)).collect();
    points.extend((1..=3).map(|k| KillAt::Forward(forward - k)));
    points.extend((0..4).map(|i| KillAt::Backward(backward * i / 4)));
    points.extend((1..=4).map(|k| KillAt::Backward(backward - k)));
    let mut endings = std::collections::BTreeMap::new();
    for kill in points {
        let run = migrate_killing(&dir, kill);
        // Once it has written its acknowledgement the destination may finish (verify, exit)
        // before the signal lands; before that it cannot.
        assert!(
            run.killed || matches!(kill, KillAt::Backward(_)),
            "{kill:?}: the destination was not killed"
        );
        assert!(
            run.elapsed < Duration::from_secs(30),
            "{kill:?}: the source took {:?}",
            run.elapsed
        );
        let ending = match &run.result {
            Ok(_) => panic!("{kill:?}: success reported, but the destination died before its acknowledgement was through"),
            Err(MigrationError::OutcomeUnknown(_)) => {
                assert!(run.source_paused, "{kill:?}: outcome unknown, yet the source runs");
                "outcome unknown, source paused"
            }
            Err(e) => {
                assert!(!run.source_paused, "{kill:?}: failed ({e}), yet the source is paused");
                "failed, source runs"
            }
        };
        *endings.entry(ending).or_insert(0) += 1;
    }
    eprintln!("endings: {endings:?}");
    assert_eq!(endings.len(), 2, "both endings reached: {endings:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
