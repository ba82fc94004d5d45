//! The real agent binary driven over pipes with the tests' own client (no VM needed): every
//! command answers exactly as documented, bad input is refused, and `shutdown` ends it cleanly.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ferry_lab::{AgentClient, AgentError};

const T: Duration = Duration::from_secs(30);

fn start() -> Result<(Child, AgentClient)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-guest-agent"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting ferry-guest-agent")?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let stdin = child.stdin.take().context("agent stdin")?;
    let mut agent = AgentClient::new(stdout, stdin);
    agent.wait_ready(T)?;
    Ok((child, agent))
}

fn refused(agent: &mut AgentClient, command: &str) -> Result<String> {
    match agent.command(command, T) {
        Err(AgentError::Refused { answer, .. }) => Ok(answer),
        other => anyhow::bail!("`{command}` should be refused, got {other:?}"),
    }
}

#[test]
fn data_set_commands_answer_as_documented() -> Result<()> {
    let (mut child, mut agent) = start()?;
    ensure!(refused(&mut agent, "verify")?.starts_with("ERR verify: no data set"));
    ensure!(agent.command("dataset 8", T)? == "dataset pages=2048 generation=0");
    ensure!(agent.command("verify", T)? == "verify pages=2048");
    ensure!(agent.command("bump", T)? == "bump pages=2048 generation=1");
    ensure!(agent.command("verify", T)? == "verify pages=2048");
    // A new data set replaces the old one and starts again at generation 0.
    ensure!(agent.command("dataset 4", T)? == "dataset pages=1024 generation=0");

    let meminfo = agent.command("meminfo", T)?;
    ensure!(meminfo.starts_with("meminfo total_kib="), "{meminfo}");
    // Wherever this runs, `features` either finds a balloon or says there is none.
    match agent.command("features", T) {
        Ok(f) => ensure!(f.split_whitespace().nth(1).map(str::len) == Some(64), "{f}"),
        Err(AgentError::Refused { answer, .. }) => {
            ensure!(answer.starts_with("ERR features: "), "{answer}")
        }
        Err(e) => return Err(e.into()),
    }

    ensure!(agent.command("shutdown", T)? == "shutdown");
    ensure!(child.wait()?.success());
    Ok(())
}

#[test]
fn workloads_and_heartbeats_run_and_stop() -> Result<()> {
    let (mut child, mut agent) = start()?;
    ensure!(agent.command("workload freed 4", T)? == "workload freed mib=4");
    ensure!(agent.command("workload stop", T)? == "workload stop kind=none");

    ensure!(agent.command("workload dirty 4 64", T)? == "workload dirty started");
    let busy = refused(&mut agent, "workload dirty 4 8")?;
    ensure!(busy.contains("already running"), "{busy}");
    std::thread::sleep(Duration::from_millis(200));
    let dirty = agent.command("workload stop", T)?;
    ensure!(
        dirty.starts_with("workload stop kind=dirty pages="),
        "{dirty}"
    );
    ensure!(dirty != "workload stop kind=dirty pages=0", "{dirty}");

    // Different kinds run side by side; status reports them without stopping them.
    ensure!(agent.command("workload check 2 64", T)? == "workload check started");
    ensure!(agent.command("workload churn 2", T)? == "workload churn started");
    std::thread::sleep(Duration::from_millis(200));
    let status = agent.command("workload status", T)?;
    ensure!(
        status.starts_with("workload status kind=check pages=")
            && status.contains(" kind=churn cycles="),
        "{status}"
    );
    ensure!(status.contains("mismatches=0 first=-"), "{status}");
    ensure!(agent.command("workload idle", T)? == "workload idle");
    ensure!(agent.command("workload stop", T)? == "workload stop kind=none");

    ensure!(agent.command("heartbeat 20", T)? == "heartbeat interval_ms=20");
    let first = agent.wait_for("HB", T, |l| l.starts_with("HB "))?;
    let second = agent.wait_for("HB", T, |l| l.starts_with("HB "))?;
    ensure!(first == "HB 1" && second == "HB 2", "{first} then {second}");
    ensure!(agent.command("heartbeat 0", T)? == "heartbeat interval_ms=0");

    ensure!(agent.command("shutdown", T)? == "shutdown");
    ensure!(child.wait()?.success());
    Ok(())
}

#[test]
fn bad_input_is_refused_and_the_agent_keeps_going() -> Result<()> {
    let (mut child, mut agent) = start()?;
    for (command, reason) in [
        ("reboot", "ERR reboot: unknown command"),
        ("dataset", "ERR dataset: usage"),
        ("dataset 0", "ERR dataset: \"0\" is not a number"),
        ("dataset 1048576", "ERR dataset: 1048576 MiB asked but only"),
        ("workload dirty 4", "ERR workload: usage"),
        (
            "heartbeat 1",
            "ERR heartbeat: \"1\" is not a number in 10..=",
        ),
        ("bump", "ERR bump: no data set"),
    ] {
        let answer = refused(&mut agent, command)?;
        ensure!(answer.starts_with(reason), "`{command}` gave {answer:?}");
    }
    let long = "x".repeat(5000);
    let answer = refused(&mut agent, &long)?;
    ensure!(
        answer.starts_with("ERR input: line longer than"),
        "{answer}"
    );
    ensure!(agent.command("verify", T).is_err());
    ensure!(agent.command("dataset 1", T)? == "dataset pages=256 generation=0");

    ensure!(agent.command("shutdown", T)? == "shutdown");
    ensure!(child.wait()?.success());
    Ok(())
}
