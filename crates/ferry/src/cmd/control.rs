//! The control commands: `ferry status`, `pause`, `resume`, `balloon`, `shutdown`,
//! `cancel` and `vcpus`, each a client of a running VMM's control API (`--api SOCK`, the VMM's
//! `--api-socket`). Human output by default, the API's JSON with `--json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use ferry_vmm::{ApiClient, Request};

use crate::units::{mib, parse_size};

/// A VMM's control socket and the output format.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The VMM's control socket (its --api-socket).
    #[arg(long)]
    pub api: PathBuf,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry balloon` arguments: without a setting, shows the balloon and the guest's memory.
#[derive(Debug, Clone, Args)]
pub struct BalloonArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Let the guest use this much memory (e.g. 384M; a bare number is MiB): the balloon
    /// takes the rest of the VM's RAM, as `virsh setmem` does.
    #[arg(long, value_parser = parse_size, conflicts_with = "size")]
    pub guest_memory: Option<u64>,
    /// Set the balloon itself to this size (e.g. 128M; 0 gives everything back).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
}

/// The control commands.
#[derive(Debug, Clone, Subcommand)]
pub enum ControlCommand {
    /// Show the VM's state, resources, balloon and migration.
    Status(ApiArgs),
    /// Pause the guest (refused while a migration owns the VM).
    Pause(ApiArgs),
    /// Resume the guest (also ends the wait after a migration whose outcome is unknown:
    /// only if the destination does not run the guest, see docs/migration.md).
    Resume(ApiArgs),
    /// Show the balloon and the guest's memory statistics, or change the balloon.
    Balloon(BalloonArgs),
    /// Stop the VM; its VMM process exits.
    Shutdown(ApiArgs),
    /// Cancel the running migration of the VMM: the guest keeps running there and the
    /// destination discards what it received (too late once the guest was handed over).
    Cancel(ApiArgs),
    /// Show what every vCPU is doing (registers, pending events, local APIC), to diagnose a
    /// guest that stopped answering; the vCPUs stop for the read.
    Vcpus(ApiArgs),
}

fn connect(api: &Path) -> Result<ApiClient> {
    ApiClient::connect(api).with_context(|| format!("the VMM at {}", api.display()))
}

fn request(api: &Path, request: &Request) -> Result<Value> {
    connect(api)?
        .request(request)
        .with_context(|| format!("the VMM at {}", api.display()))
}

/// Runs a control command; what it prints goes to stdout.
pub fn run(command: &ControlCommand) -> Result<()> {
    match command {
        ControlCommand::Status(a) => {
            let status = request(&a.api, &Request::Status)?;
            print(a.json, &status, status_text)
        }
        ControlCommand::Pause(a) => done(a, &Request::Pause, "paused"),
        ControlCommand::Resume(a) => done(a, &Request::Resume, "running"),
        ControlCommand::Shutdown(a) => done(a, &Request::Shutdown, "shutting down"),
        ControlCommand::Cancel(a) => done(
            a,
            &Request::MigrateCancel,
            "cancel requested: the migration stops, the guest keeps running there",
        ),
        ControlCommand::Balloon(b) => balloon(b),
        ControlCommand::Vcpus(a) => {
            let vcpus = request(&a.api, &Request::Vcpus)?;
            print(a.json, &vcpus, vcpus_text)
        }
    }
}

/// One line per vCPU, and a warning for one that cannot run.
fn vcpus_text(vcpus: &Value) -> String {
    let mut out = String::new();
    for v in vcpus.as_array().into_iter().flatten() {
        let id = &v["id"];
        out.push_str(&format!(
            "vCPU {id}: {}\n",
            v["state"].as_str().unwrap_or("?")
        ));
        if let Some(table) = v["page_tables_outside_ram"].as_u64() {
            out.push_str(&format!(
                "vCPU {id}: its page tables at {table:#x} lie outside the guest's RAM: this \
                 guest cannot run (CR3 rewritten below it)\n"
            ));
        }
    }
    out
}

/// Sends a request without a result and says what happened.
fn done(a: &ApiArgs, req: &Request, what: &str) -> Result<()> {
    request(&a.api, req)?;
    if a.json {
        println!("{}", serde_json::json!({ "ok": true }));
    } else {
        println!("{what}");
    }
    Ok(())
}

fn print(json: bool, value: &Value, text: fn(&Value) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

fn balloon(b: &BalloonArgs) -> Result<()> {
    let api = &b.api.api;
    let target = match (b.guest_memory, b.size) {
        (Some(guest), _) => {
            let status = request(api, &Request::Status)?;
            let ram = status["memory_bytes"]
                .as_u64()
                .context("the VMM's status has no memory_bytes")?;
            if guest > ram {
                bail!(
                    "--guest-memory {} is more than the VM's RAM ({})",
                    mib(guest),
                    mib(ram)
                );
            }
            Some(ram - guest)
        }
        (None, size) => size,
    };
    if let Some(target_bytes) = target {
        request(api, &Request::BalloonSet { target_bytes })?;
    }
    let mut client = connect(api)?;
    let info = client
        .request(&Request::BalloonGet)
        .with_context(|| format!("the VMM at {}", api.display()))?;
    let stats = client
        .request(&Request::BalloonStats)
        .with_context(|| format!("the VMM at {}", api.display()))?;
    let memory = client
        .request(&Request::Status)
        .map(|s| s["memory_bytes"].clone())
        .unwrap_or(Value::Null);
    let all = serde_json::json!({ "balloon": info, "stats": stats, "memory_bytes": memory });
    print(b.api.json, &all, balloon_text)
}

fn bytes(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_owned(), mib)
}

/// `status` as text, one `name  value` line each.
pub fn status_text(s: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<10} {v}\n"));
    line("state", s["state"].as_str().unwrap_or("?").to_owned());
    line("vcpus", s["vcpus"].to_string());
    line("memory", bytes(&s["memory_bytes"]));
    let up = s["uptime_ms"].as_u64().unwrap_or(0) / 1000;
    line(
        "uptime",
        format!("{}h {:02}m {:02}s", up / 3600, up / 60 % 60, up % 60),
    );
    let b = &s["balloon"];
    if b.is_object() {
        line("balloon", balloon_line(b));
    } else {
        line("balloon", "none".to_owned());
    }
    if let Some(t) = s["throttle_percent"].as_u64().filter(|&t| t > 0) {
        line(
            "throttle",
            format!("{t}% (the vCPUs run {}% of the time)", 100 - t.min(100)),
        );
    }
    let m = &s["migration"];
    if m.is_object() {
        line("migration", migration_line(m));
    }
    out
}

fn balloon_line(b: &Value) -> String {
    let mut features = Vec::new();
    if b["free_page_hint"] == Value::Bool(true) {
        features.push("free page hints");
    }
    if b["page_reporting"] == Value::Bool(true) {
        features.push("page reporting");
    }
    format!(
        "{} (target {}){}",
        bytes(&b["actual_bytes"]),
        bytes(&b["target_bytes"]),
        if features.is_empty() {
            String::new()
        } else {
            format!("; guest driver uses {}", features.join(", "))
        }
    )
}

fn migration_line(m: &Value) -> String {
    let to = m["to"].as_str().unwrap_or("?");
    let phase = m["phase"].as_str().unwrap_or("?");
    let sent = bytes(&m["bytes"]);
    let secs = m["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    match phase {
        "precopy" | "switchover" => {
            let mut line = format!(
                "{phase} to {to}: round {}{}, {}/{} pages, {sent} sent, {secs:.1} s",
                m["round"],
                if m["is_final"] == Value::Bool(true) {
                    " (final)"
                } else {
                    ""
                },
                m["pages_done"],
                m["pages_queued"]
            );
            if let Some(expected) = m["expected_downtime_ms"].as_f64() {
                line += &format!(
                    "; last round: {} pages dirtied ({:.0}/s), sent at {:.1} MiB/s; a \
                     switchover now would pause {expected:.0} ms",
                    m["pages_dirty"],
                    m["dirty_rate_pages_per_s"].as_f64().unwrap_or(0.0),
                    m["throughput_bytes_per_s"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20)
                );
            }
            line
        }
        "failed" | "outcome_unknown" => format!(
            "{phase} (to {to}): {}",
            m["error"].as_str().unwrap_or("no reason given")
        ),
        _ => format!("{phase} (to {to}), {sent} sent"),
    }
}

/// `balloon` as text: the device, then the guest's statistics.
pub fn balloon_text(all: &Value) -> String {
    let mut out = format!("balloon    {}\n", balloon_line(&all["balloon"]));
    let (ram, actual) = (
        all["memory_bytes"].as_u64(),
        all["balloon"]["actual_bytes"].as_u64(),
    );
    if let (Some(ram), Some(actual)) = (ram, actual) {
        out += &format!(
            "guest has  {} of {}\n",
            mib(ram.saturating_sub(actual)),
            mib(ram)
        );
    }
    let s = &all["stats"];
    if !s.is_object() {
        out += "stats      none yet (the guest's driver sends them every few seconds)\n";
        return out;
    }
    for (key, label) in [
        ("total_memory", "total"),
        ("free_memory", "free"),
        ("available_memory", "available"),
        ("disk_caches", "caches"),
    ] {
        out += &format!("{label:<10} {}\n", bytes(&s[key]));
    }
    for (key, label) in [
        ("major_faults", "major faults"),
        ("minor_faults", "minor faults"),
    ] {
        if let Some(n) = s[key].as_u64() {
            out += &format!("{label:<10} {n}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_shows_the_vm_its_balloon_and_a_running_migration() {
        let s = json!({
            "state": "running", "vcpus": 2, "memory_bytes": 1u64 << 30, "uptime_ms": 3_723_000,
            "throttle_percent": 30,
            "balloon": {"target_bytes": 256u64 << 20, "actual_bytes": 128u64 << 20,
                        "acked_features": 0, "free_page_hint": true, "page_reporting": false},
            "migration": {"to": "10.0.0.2:4444", "hints": true, "phase": "precopy", "round": 2,
                          "is_final": false, "pages_queued": 100, "pages_done": 40,
                          "bytes": 3u64 << 20, "elapsed_ms": 1500, "error": null, "stats": null,
                          "pages_dirty": 500, "dirty_rate_pages_per_s": 250.0,
                          "throughput_bytes_per_s": 8388608.0, "expected_downtime_ms": 244.1}
        });
        let t = status_text(&s);
        assert!(t.contains("state      running\n"), "{t}");
        assert!(t.contains("memory     1024.0 MiB\n"), "{t}");
        assert!(t.contains("uptime     1h 02m 03s\n"), "{t}");
        assert!(
            t.contains("throttle   30% (the vCPUs run 70% of the time)\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "balloon    128.0 MiB (target 256.0 MiB); guest driver uses free page hints\n"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "migration  precopy to 10.0.0.2:4444: round 2, 40/100 pages, 3.0 MiB sent, 1.5 s"
            ),
            "{t}"
        );
    }

    #[test]
    fn vcpus_flags_one_whose_page_tables_lie_outside_ram() {
        let v = json!([
            {"id": 0, "state": "mp_state=0 rip=0xffffffff81a18710 cr3=0x2738000"},
            {"id": 1, "state": "mp_state=0 rip=0xffffffffc035120c cr3=0x102e24000",
             "page_tables_outside_ram": 0x1_02e2_4000u64}
        ]);
        let t = vcpus_text(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(
            lines[0],
            "vCPU 0: mp_state=0 rip=0xffffffff81a18710 cr3=0x2738000"
        );
        assert!(lines[1].starts_with("vCPU 1: mp_state=0"), "{t}");
        assert!(
            lines[2].starts_with("vCPU 1: its page tables at 0x102e24000 lie outside"),
            "{t}"
        );
    }

    #[test]
    fn status_without_balloon_and_after_a_failed_migration() {
        let s = json!({
            "state": "paused", "vcpus": 1, "memory_bytes": 512u64 << 20, "uptime_ms": 0,
            "balloon": null,
            "migration": {"to": "h:1", "phase": "outcome_unknown", "error": "no acknowledgement"}
        });
        let t = status_text(&s);
        assert!(t.contains("balloon    none\n"), "{t}");
        assert!(!t.contains("throttle"), "{t}");
        assert!(
            t.contains("migration  outcome_unknown (to h:1): no acknowledgement"),
            "{t}"
        );
    }

    #[test]
    fn balloon_shows_what_the_guest_has_and_its_statistics() {
        let all = json!({
            "memory_bytes": 1u64 << 30,
            "balloon": {"target_bytes": 256u64 << 20, "actual_bytes": 256u64 << 20,
                        "free_page_hint": true, "page_reporting": true},
            "stats": {"total_memory": 768u64 << 20, "free_memory": 500u64 << 20,
                      "available_memory": null, "major_faults": 7}
        });
        let t = balloon_text(&all);
        assert!(t.contains("guest has  768.0 MiB of 1024.0 MiB\n"), "{t}");
        assert!(t.contains("free       500.0 MiB\n"), "{t}");
        assert!(t.contains("available  -\n"), "{t}");
        assert!(t.contains("major faults 7\n"), "{t}");
        let none = balloon_text(&json!({"balloon": {}, "stats": null}));
        assert!(none.contains("none yet"), "{none}");
    }
}
