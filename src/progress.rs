//! Progress bars with ETA, the project's one style, for long jobs (training, evaluation,
//! `leuknet-card fit-ood`).

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar with ETA, the project's one style. On a terminal it redraws in place; when
/// stderr is a file or a pipe (CI, `nohup`, logs) it prints the same line at most every
/// [`LOG_PROGRESS_EVERY`] instead, so long runs still show progress and ETA in their logs.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    use std::io::IsTerminal;
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::with_draw_target(
            Some(len),
            indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(LineLog::default()), 1),
        )
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {pos}/{len} {per_sec} elapsed {elapsed_precise} eta {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// How often a progress line is written when stderr is not a terminal.
pub const LOG_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// An indicatif terminal that appends lines to stderr, throttled, ignoring cursor movement.
#[derive(Debug, Default)]
struct LineLog {
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl indicatif::TermLike for LineLog {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, line: &str) -> std::io::Result<()> {
        self.write_str(line)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < LOG_PROGRESS_EVERY) {
            return Ok(());
        }
        *last = Some(std::time::Instant::now());
        eprintln!("{s}");
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}
