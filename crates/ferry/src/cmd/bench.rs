//! `ferry bench`: the engine's performance numbers, printed as a markdown table.
//!
//! Everything runs in this process over loopback TCP, so the raw socket figure and the
//! engine's figure come from the same machine in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use ferry_migration::hint::{HintInbox, HintTargets};
use ferry_migration::zero::page_is_zero;
use ferry_migration::{
    connect, BitmapDirtyLog, Compression, Destination, Epoch, GuestRange, HintKind, Listener,
    MemoryLayout, Migration, MigrationConfig, MigrationStats, PageBitmap, ReceiveConfig,
    RegionDesc, Tls, UnpopulatedSource,
};
use ferry_sim::{create_memory, Guest, HintBehavior, SimConfig, SimVm, Workload};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

use crate::units::{mib, parse_size};

/// `ferry bench` arguments.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Bytes moved by the throughput measurements.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub throughput_bytes: u64,
    /// Guest size of the simulated migration with and without hints.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub guest: u64,
}

fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / f64::from(1u32 << 30)
}

/// A plain socket copy of `bytes` over loopback TCP, 2 MiB writes, reader discarding.
fn raw_tcp(bytes: u64) -> Result<Duration> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 2 << 20];
        while s.read(&mut buf)? > 0 {}
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 2 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(t.elapsed())
}

/// The destination's memory and how pages get into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    /// Fresh memory, written through the memfd (`ReceiveConfig::write_through_file`, what
    /// ferry's VMM does).
    FreshFile,
    /// Fresh memory, written through the mapping (a fault and a cleared page per page).
    FreshMapping,
    /// Memory faulted in beforehand, written through the mapping: the engine's own cost.
    Populated,
}

/// Migrates a guest of `bytes` whose every page holds data, hints off, over loopback TCP
/// (under TLS when `tls` is given).
fn engine_tcp(
    bytes: u64,
    dest: Dest,
    tls: Option<&Tls>,
    compression: Compression,
) -> Result<(Duration, MigrationStats)> {
    let (stats, _) = sim_migration(
        bytes,
        Workload::Idle,
        100,
        false,
        dest,
        Link { tls, compression },
    )?;
    Ok((Duration::from_secs_f64(stats.total_ms / 1000.0), stats))
}

/// Credentials for both ends of a TLS migration on this host, from a throwaway CA.
fn throwaway_tls() -> Result<Tls> {
    let ca = ferry_lab::pki::TestCa::new("ferry bench CA");
    let end = ca.end(&["127.0.0.1"]);
    Ok(Tls::from_pem(
        end.cert.as_bytes(),
        end.key.as_bytes(),
        ca.pem().as_bytes(),
    )?)
}

/// How the stream travels: TLS, compression.
#[derive(Clone, Copy, Default)]
struct Link<'a> {
    tls: Option<&'a Tls>,
    compression: Compression,
}

/// An in-process migration of a simulated guest over loopback TCP.
fn sim_migration(
    bytes: u64,
    workload: Workload,
    used_percent: u8,
    hints: bool,
    dest: Dest,
    link: Link<'_>,
) -> Result<(MigrationStats, u64)> {
    let tls = link.tls;
    let src = create_memory(bytes)?;
    let dst = create_memory(bytes)?;
    if dest == Dest::Populated {
        // Fault the destination's memory in beforehand, to separate the engine's cost from
        // the kernel's cost of allocating and clearing fresh pages.
        let page = [0u8; 4096];
        for region in dst.iter() {
            let start = region.start_addr().0;
            for off in (0..region.len()).step_by(4096) {
                dst.write_slice(&page, GuestAddress(start + off))?;
            }
        }
    }
    let vm = SimVm::new(
        Guest::new(src.clone(), 7),
        SimConfig {
            used_percent,
            workload,
            hints: hints.then_some(HintBehavior::Honest { delay_ticks: 0 }),
            zero_on_alloc: false,
        },
    );
    let mut l = Listener::bind(&"127.0.0.1:0".parse().map_err(anyhow::Error::msg)?)?;
    if let Some(t) = tls {
        l = l.with_tls(t.clone());
    }
    let endpoint = l.local_endpoint()?;
    let d = dst.clone();
    let receiver = thread::spawn(move || -> Result<u64> {
        let config = ReceiveConfig {
            write_through_file: dest == Dest::FreshFile,
            ..ReceiveConfig::default()
        };
        let r = Destination::new(&d, config)?.accept(&l)?;
        let pages = r.stats.pages;
        r.acknowledge()?;
        Ok(pages)
    });
    let conns = connect(&endpoint, 1, tls)?;
    let mut dirty = BitmapDirtyLog::new(src.clone());
    let mut control = vm.clone();
    let mut observer = ferry_sim::SimDriver(vm.clone());
    let mut sim_hints = vm.hint_source();
    let mut unpopulated = UnpopulatedSource::new(&src);
    let config = MigrationConfig {
        hints,
        compression: link.compression,
        ..MigrationConfig::default()
    };
    let mut m = Migration::new(&src, &mut dirty, &mut control, &mut observer, config)?;
    if let Some(h) = sim_hints.as_mut() {
        m.add_source(h);
    }
    m.add_source(&mut unpopulated);
    let stats = m.run(conns)?;
    let pages = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok((stats, pages))
}

/// The kernel alone: `bytes` written with 2 MiB `pwrite`s into a fresh memfd, the
/// destination's cost of fresh memory without any network (the ceiling of the engine's
/// fresh-memory figure on this machine).
fn fresh_memfd_writes(bytes: u64) -> Result<Duration> {
    let fd = rustix::fs::memfd_create("ferry-bench-fresh", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = std::fs::File::from(fd);
    file.set_len(bytes)?;
    let buf = vec![0x5au8; 2 << 20];
    let t = Instant::now();
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(buf.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(&file, &buf[..n], at)?;
        at += n as u64;
    }
    Ok(t.elapsed())
}

/// Zero detection over `bytes` of zeroed memory, page by page in place, as the engine checks
/// guest memory.
fn zero_detection(bytes: u64) -> Duration {
    // Fill explicitly: a fresh zeroed allocation maps the shared zero page, which would make
    // the measurement read the same cached page over and over.
    let mut buf = vec![1u8; bytes as usize];
    buf.fill(0);
    let mut buf = std::hint::black_box(buf);
    let memory = VolatileSlice::from(&mut buf[..]);
    let t = Instant::now();
    let zero = (0..memory.len() / 4096)
        .filter(|i| {
            memory
                .subslice(i * 4096, 4096)
                .is_ok_and(|page| page_is_zero(&page))
        })
        .count();
    let d = t.elapsed();
    assert_eq!(zero as u64, bytes / 4096, "zeroed memory is zero");
    d
}

/// Applies hints covering all of a 4 GiB guest, as `range_pages`-page ranges.
fn hint_application(guest: u64, range_pages: u64) -> Duration {
    let layout = MemoryLayout::new(vec![RegionDesc {
        gpa: 0,
        size: guest,
    }])
    .expect("layout");
    let pages = layout.pages();
    let (mut to_send, dest, mut kz) = (
        PageBitmap::full(pages),
        PageBitmap::new(pages),
        PageBitmap::new(pages),
    );
    let mut inbox = HintInbox::new();
    let sink = inbox.register("bench", HintKind::Free);
    inbox.open(Epoch(0));
    let ranges: Vec<GuestRange> = (0..pages / range_pages)
        .map(|i| GuestRange::new(i * range_pages * 4096, range_pages * 4096))
        .collect();
    let mut elapsed = Duration::ZERO;
    // Deliver in inbox-sized slices so nothing is dropped; time only the application.
    for slice in ranges.chunks(ferry_migration::hint::RANGES_PER_MESSAGE_MAX * 1024) {
        sink.hint(Epoch(0), slice);
        let t = Instant::now();
        let mut targets = HintTargets {
            to_send: &mut to_send,
            dest_nonzero: &dest,
            known_zero: &mut kz,
            audit: None,
        };
        while inbox.drain(&layout, &mut targets, u64::MAX).messages > 0 {}
        elapsed += t.elapsed();
    }
    assert_eq!(to_send.count(), 0, "every page was hinted away");
    elapsed
}

/// Runs `ferry bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let n = args.throughput_bytes;
    eprintln!("measuring raw loopback TCP ({})...", mib(n));
    let raw = raw_tcp(n).context("raw TCP")?;
    eprintln!(
        "measuring the engine, non-zero pages, hints off ({})...",
        mib(n)
    );
    let none = Compression::None;
    let fresh = fresh_memfd_writes(n).context("writing a fresh memfd")?;
    let (engine, es) = engine_tcp(n, Dest::FreshFile, None, none).context("engine")?;
    let (engine_map, es_map) = engine_tcp(n, Dest::FreshMapping, None, none).context("engine")?;
    let (engine_pop, es_pop) = engine_tcp(n, Dest::Populated, None, none).context("engine")?;
    eprintln!("measuring the engine over TLS 1.3 ({})...", mib(n));
    let tls = throwaway_tls()?;
    let (engine_tls, es_tls) =
        engine_tcp(n, Dest::Populated, Some(&tls), none).context("engine over TLS")?;
    eprintln!("measuring the engine with zstd compression ({})...", mib(n));
    let zstd = Compression::Zstd { level: 1 };
    let (engine_zstd, es_zstd) =
        engine_tcp(n, Dest::Populated, None, zstd).context("engine with zstd")?;
    let zero = zero_detection(n);
    let hint_blocks = hint_application(4 << 30, 1024);
    let hint_pages = hint_application(4 << 30, 1);
    eprintln!(
        "migrating a {} simulated guest, freed workload, hints off then on...",
        mib(args.guest)
    );
    let freed = Workload::Freed { percent: 75 };
    let plain = Link::default();
    let (off, _) = sim_migration(args.guest, freed, 10, false, Dest::FreshFile, plain)?;
    let (on, _) = sim_migration(args.guest, freed, 10, true, Dest::FreshFile, plain)?;

    let raw_rate = gib_per_s(n, raw);
    let engine_rate = gib_per_s(es.bytes, engine);
    println!("| measurement | result |");
    println!("|---|---:|");
    println!("| raw loopback TCP, plain socket copy | {raw_rate:.2} GiB/s |");
    println!(
        "| kernel alone: 2 MiB writes into a fresh memfd, no network (the fresh-memory ceiling) | {:.2} GiB/s |",
        gib_per_s(n, fresh)
    );
    println!(
        "| engine, non-zero pages, 1 connection, into fresh memory (written through its memfd, as ferry's VMM does) | {engine_rate:.2} GiB/s ({:.0}% of raw) |",
        100.0 * engine_rate / raw_rate
    );
    let map_rate = gib_per_s(es_map.bytes, engine_map);
    println!(
        "| engine, same, into fresh memory written through its mapping | {map_rate:.2} GiB/s ({:.0}% of raw) |",
        100.0 * map_rate / raw_rate
    );
    let pop_rate = gib_per_s(es_pop.bytes, engine_pop);
    println!(
        "| engine, same, destination memory already populated | {pop_rate:.2} GiB/s ({:.0}% of raw) |",
        100.0 * pop_rate / raw_rate
    );
    let tls_rate = gib_per_s(es_tls.bytes, engine_tls);
    println!(
        "| engine, same, over TLS 1.3 (mutual authentication) | {tls_rate:.2} GiB/s ({:.0}% of the plain engine) |",
        100.0 * tls_rate / pop_rate
    );
    let zstd_rate = gib_per_s(es_zstd.bytes, engine_zstd);
    println!(
        "| engine, same, zstd level 1 (half the pages compressible) | {zstd_rate:.2} GiB/s of pages, {:.0}% of them on the wire |",
        100.0 * es_zstd.wire_bytes as f64 / es_zstd.bytes.max(1) as f64
    );
    println!("| zero-page detection | {:.1} GiB/s |", gib_per_s(n, zero));
    println!(
        "| hint application, 4 GiB as 4 MiB blocks | {:.3} ms |",
        hint_blocks.as_secs_f64() * 1e3
    );
    println!(
        "| hint application, 4 GiB as single pages | {:.1} ms |",
        hint_pages.as_secs_f64() * 1e3
    );
    for (name, s) in [("off", &off), ("on", &on)] {
        println!(
            "| {} guest, 75% freed, hints {name} | {:.0} ms, {}, downtime {:.1} ms |",
            mib(args.guest),
            s.total_ms,
            mib(s.bytes),
            s.downtime_ms
        );
    }
    Ok(())
}
