//! Progress of long operations on stderr (RSA keygen, ACM PCA waits, `init --config`, CA
//! rotation): drawn only when stderr is a terminal and stdout is not `--output json`.
//!
//! Commands call [`Progress::spinner`] for a wait of unknown length and [`Progress::bar`] for
//! counted steps. Both hand back a handle that clears its line when dropped. When nothing is
//! drawn the handle is inert, so callers never branch on the terminal themselves.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::common::Ctx;

/// How often a spinner redraws while the work blocks the calling thread.
const TICK: Duration = Duration::from_millis(100);

/// One long operation shown on stderr; a no-op when progress is not drawn.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Whether this invocation draws progress: stderr is a terminal and the output is not JSON.
    pub fn enabled(ctx: &Ctx) -> bool {
        !ctx.json() && std::io::stderr().is_terminal()
    }

    /// A spinner with `msg`, for a wait of unknown length. It keeps turning while the calling
    /// thread is busy (indicatif ticks from its own thread).
    pub fn spinner(ctx: &Ctx, msg: impl Into<Cow<'static, str>>) -> Progress {
        let p = Progress::hidden_or_drawn(ctx, ProgressBar::new_spinner());
        p.bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("static template")
                .tick_strings(&["-", "\\", "|", "/", " "]),
        );
        p.bar.set_message(msg);
        if !p.bar.is_hidden() {
            p.bar.enable_steady_tick(TICK);
        }
        p
    }

    /// A spinner for a wait the user must know about even without a terminal (an AWS
    /// operation that takes minutes): when nothing is drawn, `msg` is logged at warn, the
    /// default log level, instead.
    pub fn notice(ctx: &Ctx, msg: impl Into<Cow<'static, str>>) -> Progress {
        let msg = msg.into();
        if !Progress::enabled(ctx) {
            tracing::warn!("{msg}");
        }
        Progress::spinner(ctx, msg)
    }

    /// A bar of `len` counted steps with `msg` beside it.
    pub fn bar(ctx: &Ctx, len: u64, msg: impl Into<Cow<'static, str>>) -> Progress {
        let p = Progress::hidden_or_drawn(ctx, ProgressBar::new(len));
        p.bar.set_style(
            ProgressStyle::with_template("{prefix}[{bar:24}] {pos}/{len} {msg} {elapsed}")
                .expect("static template")
                .progress_chars("=> "),
        );
        p.bar.set_message(msg);
        if !p.bar.is_hidden() {
            p.bar.enable_steady_tick(TICK);
        }
        p
    }

    fn hidden_or_drawn(ctx: &Ctx, bar: ProgressBar) -> Progress {
        if !Progress::enabled(ctx) {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Progress { bar }
    }

    /// Text before the bar (for example "3 CAs, 12 workloads ").
    pub fn set_prefix(&self, prefix: impl Into<Cow<'static, str>>) {
        self.bar.set_prefix(prefix);
    }

    /// Replaces the message.
    pub fn set_message(&self, msg: impl Into<Cow<'static, str>>) {
        self.bar.set_message(msg);
    }

    /// Sets how many steps are done.
    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// `meshca init --config`: one step per CA, bundle and workload.
impl meshca::config::ApplyProgress for Progress {
    fn step(&self, done: usize, _total: usize, kind: &str, name: &str) {
        self.set_position(done as u64);
        self.set_message(format!("{kind} {name}"));
    }
}
