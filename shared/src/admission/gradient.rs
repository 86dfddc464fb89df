//! The adaptive concurrency limit: Netflix's gradient algorithm (`Gradient2Limit`), fed with the
//! latency of every admitted request.
//!
//! ```text
//!   samples ──► window (≥ 100 ms and ≥ 10 samples) ──► short RTT = the window's mean
//!                                                       long RTT  = slow average of short RTTs
//!   gradient  = clamp(TOLERANCE × long / short, 0.5, 1.0)      1.0: no queueing, grow
//!   new limit = limit × gradient + √limit                      < 1: latency grew, shrink
//!   limit     = smoothed towards the new limit, within [min, max]
//! ```
//!
//! The limit needs no latency threshold tuned to today's hardware: it compares the service with
//! itself. While latency stays within [`TOLERANCE`] of its long-run level the limit grows by a
//! small queue allowance per window; when requests start queueing (latency rises), it shrinks in
//! proportion. It does not grow while less than half of it is in use, so a quiet service keeps a
//! limit it has proven rather than one that merely never was reached.

use std::time::{Duration, Instant};

/// Latency may grow to this multiple of its long-run level before the limit shrinks: 1.5, the
/// default of Netflix's implementation. Lower values shed at the first jitter of a shared machine;
/// higher ones let queues (and so latency) grow further before reacting.
pub const TOLERANCE: f64 = 1.5;

/// The share of each new estimate taken into the limit per window (Netflix's default, 0.2): five
/// windows (half a second at [`WINDOW`]) to move most of the way, so one noisy window does not
/// halve the limit.
const SMOOTHING: f64 = 0.2;

/// The long-run latency is an exponential average over about this many windows (a minute at one
/// window per 100 ms): slow enough to stay the "unloaded" reference while a burst lasts.
const LONG_WINDOWS: f64 = 600.0;

/// A window closes after at least this long…
pub const WINDOW: Duration = Duration::from_millis(100);

/// …and at least this many samples, so an idle service does not adjust on one request's latency.
const MIN_WINDOW_SAMPLES: u32 = 10;

/// The bounds and starting point of a [`GradientLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// The limit at start.
    pub initial: usize,
    /// The limit never falls below this.
    pub min: usize,
    /// The limit never grows above this.
    pub max: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            // 100 at start: more than a demo, a test or a shop front sends at once (so none of
            // them meets a refusal before the limit has measured anything), and still a tenth of
            // the thousand upstream connections a cold burst used to open at once. From there the
            // limit follows latency.
            initial: 100,
            // The limit never sheds below 100 concurrent requests: every service here serves that
            // many with some queueing but no failures (the benchmark's 64 connections run at
            // p99 160 ms), and a limit that drops lower when a shared machine's CPU is busy
            // refused two thirds of that steady load. Above the floor the limit follows latency.
            min: 100,
            // The ceiling bounds memory and sockets even if latency never rises: 1,000 requests
            // in flight at a few kilobytes each, and as many upstream connections at most.
            max: 1000,
        }
    }
}

/// The adaptive limit's state. Not synchronised: [`crate::admission::Admission`] holds it in a
/// mutex and takes it for one sample at a time.
#[derive(Debug, Clone)]
pub struct GradientLimit {
    settings: LimitSettings,
    limit: f64,
    long_rtt: Option<f64>,
    window: Window,
}

#[derive(Debug, Clone)]
struct Window {
    started: Option<Instant>,
    samples: u32,
    rtt_sum: f64,
    max_inflight: usize,
}

impl Window {
    const fn empty() -> Self {
        Self {
            started: None,
            samples: 0,
            rtt_sum: 0.0,
            max_inflight: 0,
        }
    }
}

impl GradientLimit {
    /// A limit at `settings.initial` (clamped to the bounds).
    pub fn new(settings: LimitSettings) -> Self {
        let settings = LimitSettings {
            min: settings.min.max(1),
            max: settings.max.max(settings.min.max(1)),
            ..settings
        };
        Self {
            settings,
            limit: settings.initial.clamp(settings.min, settings.max) as f64,
            long_rtt: None,
            window: Window::empty(),
        }
    }

    /// The current limit: how many requests may be in flight at once.
    pub fn limit(&self) -> usize {
        // The limit is kept within [min, max] (both usize), so the conversion cannot truncate.
        self.limit.round() as usize
    }

    /// Records one completed request that took `rtt` while `inflight` requests (itself included)
    /// were admitted, at `now`. Returns the limit, updated when this sample closed a window.
    pub fn sample(&mut self, now: Instant, rtt: Duration, inflight: usize) -> usize {
        let window = &mut self.window;
        let started = *window.started.get_or_insert(now);
        window.samples += 1;
        window.rtt_sum += rtt.as_secs_f64();
        window.max_inflight = window.max_inflight.max(inflight);
        if now.duration_since(started) >= WINDOW && window.samples >= MIN_WINDOW_SAMPLES {
            let short = window.rtt_sum / f64::from(window.samples);
            let inflight = window.max_inflight;
            self.window = Window::empty();
            self.update(short, inflight);
        }
        self.limit()
    }

    fn update(&mut self, short: f64, inflight: usize) {
        // A zero RTT (a clock that did not move) says nothing about queueing.
        if short <= 0.0 {
            return;
        }
        let long = match self.long_rtt {
            None => short,
            Some(long) => long + (short - long) / LONG_WINDOWS,
        };
        // After a long overload the average has crept up; once latency is back to half of it,
        // bring the reference down faster than the average would, so the limit recovers.
        let long = if long / short > 2.0 {
            long * 0.95
        } else {
            long
        };
        self.long_rtt = Some(long);
        // Only a limit that is being used can be judged: do not grow it while half is idle.
        if (inflight as f64) < self.limit / 2.0 {
            return;
        }
        let gradient = (TOLERANCE * long / short).clamp(0.5, 1.0);
        let queue = self.limit.sqrt();
        let estimate = self.limit * gradient + queue;
        let smoothed = self.limit * (1.0 - SMOOTHING) + estimate * SMOOTHING;
        self.limit = smoothed.clamp(self.settings.min as f64, self.settings.max as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `windows` full windows of samples of `rtt` at `inflight`, returning the limit.
    fn feed(limit: &mut GradientLimit, start: &mut Instant, windows: u32, rtt: u64) -> usize {
        let inflight = limit.limit();
        for _ in 0..windows {
            for _ in 0..MIN_WINDOW_SAMPLES {
                limit.sample(*start, ms(rtt), inflight);
            }
            *start += WINDOW;
            limit.sample(*start, ms(rtt), inflight);
        }
        limit.limit()
    }

    #[test]
    fn the_limit_grows_while_latency_stays_at_its_usual_level() {
        let mut limit = GradientLimit::new(LimitSettings::default());
        let mut now = Instant::now();
        let after = feed(&mut limit, &mut now, 20, 10);
        assert!(after > 100, "limit {after} should have grown from 100");
    }

    #[test]
    fn the_limit_shrinks_when_latency_rises_well_above_its_usual_level() {
        let mut limit = GradientLimit::new(LimitSettings {
            initial: 200,
            min: 10,
            ..LimitSettings::default()
        });
        let mut now = Instant::now();
        let steady = feed(&mut limit, &mut now, 10, 10);
        let loaded = feed(&mut limit, &mut now, 10, 40);
        assert!(
            loaded < steady / 2,
            "limit {loaded} should be well below {steady}"
        );
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let settings = LimitSettings {
            initial: 50,
            min: 10,
            max: 60,
        };
        let mut limit = GradientLimit::new(settings);
        let mut now = Instant::now();
        assert_eq!(feed(&mut limit, &mut now, 200, 10), 60);
        assert_eq!(feed(&mut limit, &mut now, 200, 10_000), 10);
    }

    #[test]
    fn an_idle_limit_does_not_grow() {
        let mut limit = GradientLimit::new(LimitSettings {
            initial: 20,
            min: 10,
            ..LimitSettings::default()
        });
        let mut now = Instant::now();
        for _ in 0..50 {
            for _ in 0..=MIN_WINDOW_SAMPLES {
                limit.sample(now, ms(10), 2);
            }
            now += WINDOW;
        }
        assert_eq!(limit.limit(), 20);
    }

    #[test]
    fn a_window_needs_both_its_time_and_its_samples() {
        let settings = LimitSettings {
            initial: 20,
            min: 10,
            ..LimitSettings::default()
        };
        let mut limit = GradientLimit::new(settings);
        let now = Instant::now();
        // Many samples within one window's time: no update yet.
        for _ in 0..100 {
            limit.sample(now, ms(1000), 20);
        }
        // A window's time with too few samples: no update either.
        let mut sparse = GradientLimit::new(settings);
        sparse.sample(now, ms(1000), 20);
        sparse.sample(now + WINDOW * 5, ms(1000), 20);
        assert_eq!((limit.limit(), sparse.limit()), (20, 20));
    }
}
