//! Timing of the consecutive steps of a piece of work, for a debug line: how the restore on
//! a migration's destination spends the downtime (docs/benchmarks.md).

use std::time::{Duration, Instant};

/// The steps done so far and when.
#[derive(Debug)]
pub(crate) struct Steps {
    started: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    /// Starts timing now.
    pub(crate) fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            done: Vec::new(),
        }
    }

    /// Ends step `what`, begun when the previous one ended.
    pub(crate) fn done(&mut self, what: &'static str) {
        let now = Instant::now();
        self.done.push((what, now - self.last));
        self.last = now;
    }

    /// Milliseconds since [`new`](Self::new) until the last step ended.
    pub(crate) fn total_ms(&self) -> f64 {
        (self.last - self.started).as_secs_f64() * 1000.0
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (what, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{what} {:.2} ms", took.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_listed_in_order_and_sum_to_the_total() {
        let mut steps = Steps::new();
        steps.done("first");
        std::thread::sleep(Duration::from_millis(2));
        steps.done("second");
        let line = steps.to_string();
        assert!(line.starts_with("first "), "{line}");
        assert!(line.contains(" ms, second "), "{line}");
        let sum: f64 = steps
            .done
            .iter()
            .map(|(_, d)| d.as_secs_f64() * 1000.0)
            .sum();
        assert!((steps.total_ms() - sum).abs() < 1e-6);
        assert!(steps.total_ms() >= 2.0);
    }
}
