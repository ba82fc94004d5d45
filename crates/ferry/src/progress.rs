//! A terminal progress bar fed by the engine's events.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use ferry_migration::{Event, Observer};

/// Shows the current round's progress; hidden when stderr is not a terminal.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar on stderr.
    pub fn new(label: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} round {msg:<9} [{bar:30}] {pos}/{len} pages",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        Self { bar }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for Bar {
    fn event(&mut self, event: &Event<'_>) {
        match event {
            Event::RoundStarted {
                round,
                pages_queued,
                is_final,
            } => {
                self.bar.set_length(*pages_queued);
                self.bar.set_position(0);
                self.bar.set_message(if *is_final {
                    format!("{round} final")
                } else {
                    round.to_string()
                });
            }
            Event::Progress { pages_done, .. } => self.bar.set_position(*pages_done),
            Event::Completed(_) => self.bar.finish_and_clear(),
            _ => {}
        }
    }
}
