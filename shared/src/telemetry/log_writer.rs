//! The log writer: log lines are appended to a shared buffer in memory, and one background
//! thread writes what has gathered to stdout, waking at most once every [`LINGER`].
//!
//! ```text
//!  any thread: line ──▶ lock, append to the buffer, unlock       (wakes the thread only if the
//!                                                                  buffer was empty and it sleeps)
//!  log thread: sleep until a line comes ─▶ wait LINGER ─▶ swap the buffer out ─▶ one write(2)
//! ```
//!
//! Why not one hand-off per line (as `tracing-appender`'s non-blocking writer, which this
//! replaced): a channel send that finds the writer asleep is a futex wake-up and a context switch,
//! and a queue drained line by line is a `write` per line. At a thousand requests a second every
//! service paid both per line; the benchmark's profile showed the log thread at 2–6 % of each
//! service's CPU, besides the wake-ups on the request threads. Here a burst of any size costs one
//! wake-up and one `write`, and a request thread never enters the kernel to log.
//!
//! A slow or blocked stdout never blocks a request: the buffer grows instead, up to [`LIMIT`];
//! past it, lines are dropped and counted, and the count is logged once the writer catches up.
//! A line reaches stdout within about [`LINGER`] plus one `write`; the lines of the last
//! [`LINGER`] before a `SIGKILL` are lost, as those still queued in any in-process log buffer
//! are. [`LogWriterGuard`], dropped at the end of `main`, writes everything left.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the log thread lets lines gather after the first one wakes it: short enough that a
/// line is on stdout before anyone reading it could tell, long enough that a busy service writes a
/// few hundred times a second, not once per line.
pub const LINGER: Duration = Duration::from_millis(5);

/// Bytes held before lines are dropped: about 100,000 lines, seconds of the busiest service's
/// output, should stdout stop being read.
pub const LIMIT: usize = 32 * 1024 * 1024;

/// The capacity a drained buffer keeps; one that a burst grew beyond [`KEEP`] is given back.
const KEEP: usize = 256 * 1024;

/// Appends log lines for the log thread; cheap to clone. `write` takes a whole line (the JSON
/// layer and `tracing-subscriber`'s formatter each write one line per call).
#[derive(Debug, Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Keeps the log thread running; dropping it writes every line appended so far and stops the
/// thread.
#[derive(Debug)]
pub struct LogWriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<u8>,
    /// Lines dropped since the thread last wrote.
    dropped: u64,
    /// The thread is waiting on `wake` (so a line into an empty buffer must wake it).
    sleeping: bool,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes in a buffer: carry on with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the log thread writing to `out`.
///
/// # Errors
/// The thread cannot be spawned.
pub fn spawn<W: Write + Send + 'static>(out: W) -> std::io::Result<(LogWriter, LogWriterGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = std::thread::Builder::new()
        .name("log-writer".to_owned())
        .spawn({
            let shared = shared.clone();
            move || write_out(&shared, out)
        })?;
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        LogWriterGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl LogWriter {
    fn append(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if state.closing {
            // After the guard is gone (a line logged while `main` returns): straight to stdout.
            drop(state);
            let _ = std::io::stdout().lock().write_all(line);
            return;
        }
        if state.lines.len() + line.len() > LIMIT {
            state.dropped += 1;
            return;
        }
        let wake = state.lines.is_empty() && state.sleeping;
        state.lines.extend_from_slice(line);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

impl Write for &LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for LogWriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The log thread: sleeps until lines come, lets more gather for [`LINGER`], writes them all.
fn write_out(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.lines.is_empty() && !state.closing {
            state.sleeping = true;
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            state.sleeping = false;
        }
        let closing = state.closing;
        if !closing {
            drop(state);
            std::thread::sleep(LINGER);
            state = shared.lock();
        }
        std::mem::swap(&mut state.lines, &mut batch);
        let dropped = std::mem::take(&mut state.dropped);
        drop(state);

        // Nothing to do about a failed write to stdout but go on: the next batch may succeed.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        if batch.capacity() > KEEP {
            batch = Vec::new();
        } else {
            batch.clear();
        }
        if dropped > 0 {
            // Through the subscriber, so it has the service's format; it lands in the buffer.
            tracing::warn!(dropped, "log lines dropped: stdout was not keeping up");
        }
        if closing {
            // Anything appended while writing the last batch (the warning above) goes too.
            let rest = std::mem::take(&mut shared.lock().lines);
            let _ = out.write_all(&rest).and_then(|()| out.flush());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes written to "stdout", and how many `write` calls it took.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut sink = self.0.lock().expect("sink");
            sink.0.extend_from_slice(buf);
            sink.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("sink").0.clone()).expect("utf-8")
        }

        fn writes(&self) -> usize {
            self.0.lock().expect("sink").1
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_in_each_threads_order_and_all_by_the_guards_drop() {
        let sink = Sink::default();
        let (writer, guard) = spawn(sink.clone()).expect("spawns");
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for n in 0..2_000 {
                        let mut writer = writer.make_writer();
                        writer
                            .write_all(format!("{thread} {n} {}\n", "x".repeat(n % 50)).as_bytes())
                            .expect("writes");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("joins");
        }
        drop(guard);

        let text = sink.text();
        let mut next = [0_usize; 4];
        for line in text.lines() {
            let mut fields = line.split(' ');
            let thread: usize = fields.next().expect("thread").parse().expect("number");
            let n: usize = fields.next().expect("n").parse().expect("number");
            assert_eq!(
                fields.next(),
                Some("x".repeat(n % 50).as_str()),
                "torn: {line}"
            );
            assert_eq!(n, next[thread], "thread {thread} out of order");
            next[thread] += 1;
        }
        assert_eq!(next, [2_000; 4]);
        // 8,000 lines, written in batches, not one by one.
        assert!(sink.writes() < 1_000, "{} writes", sink.writes());
    }

    #[test]
    fn a_line_reaches_the_output_within_the_linger_without_more_lines_or_a_flush() {
        let sink = Sink::default();
        let (writer, _guard) = spawn(sink.clone()).expect("spawns");
        writer.make_writer().write_all(b"alone\n").expect("writes");
        let waited = std::time::Instant::now();
        while sink.text().is_empty() {
            assert!(waited.elapsed() < Duration::from_secs(5), "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.text(), "alone\n");
    }

    /// An output whose first write blocks until the test lets it go: stdout nobody reads.
    struct Stuck {
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn while_the_output_is_stuck_lines_are_held_up_to_the_limit_then_dropped_and_counted() {
        let (entered, inside) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        let (writer, guard) = spawn(Stuck {
            entered,
            release: released,
        })
        .expect("spawns");
        writer.make_writer().write_all(b"first\n").expect("writes");
        inside.recv().expect("the thread is writing, and stuck");

        let line = vec![b'x'; 1024 * 1024];
        for _ in 0..LIMIT / line.len() + 3 {
            // Never blocks, never fails.
            writer.make_writer().write_all(&line).expect("writes");
        }
        let state = writer.shared.lock();
        assert_eq!(state.lines.len(), LIMIT);
        assert_eq!(state.dropped, 3);
        drop(state);
        drop(release);
        drop(guard);
    }
}
