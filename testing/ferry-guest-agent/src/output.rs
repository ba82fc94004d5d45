//! Console output shared by the command loop and the background threads.

use std::fmt;
use std::io::{self, Write};

/// Writes one line to stdout (the serial console) atomically with respect to the agent's other
/// threads. Write errors are ignored: the console is the only place they could be reported.
pub fn emit(line: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
