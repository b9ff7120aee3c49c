//! The plugin pool: the only threads guest code runs on.
//!
//! Evaluations that run a plugin are handed to a small pool of dedicated
//! threads, never run on the HTTP workers, so static and JsonLogic flags and
//! the health endpoints answer whatever plugins do.
//!
//! Why threads and not async wasmtime yielding on epochs (as Spin does):
//! evaluation is synchronous, and a plugin can be one JsonLogic operator
//! called from inside datalogic's evaluator, which cannot await. And a guest
//! that yields still spends the worker's CPU between yields; here it spends
//! a pool thread's, and the share below leaves threads, and cores, to the
//! rest. (Pool threads can also run niced, `Limits::pool_nice`; measured,
//! it bought nothing over the share and cost deadlines under contention.)
//!
//! Fair share: work is queued per *lane* (the plugin a flag runs), and the
//! threads take lanes in turn (round robin), each lane at most `share`
//! threads at once. A plugin that spins can hold its share, never the whole
//! pool; other plugins' evaluations are taken in their turn. A lane's queue
//! is bounded: past it, a call is refused at once ([`PoolError::Full`]).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tracing::{debug, warn};

use crate::flags::FastMap as HashMap;

/// Why the pool did not run a job.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// The lane's queue is full.
    #[error("plugin {lane} has {waiting} evaluations waiting, its limit; try again")]
    Full {
        /// The lane (plugin) refused.
        lane: String,
        /// Its queue's bound.
        waiting: usize,
    },
    /// The job panicked (a bug in flaghost, not in the plugin: guest
    /// failures are errors, not panics), or the pool is shutting down.
    #[error("the evaluation of plugin {lane} failed inside flaghost; see the logs")]
    Lost {
        /// The lane (plugin).
        lane: String,
    },
}

/// How big the pool is and how it shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    /// Threads guest code runs on.
    pub threads: usize,
    /// Threads one lane (plugin) may hold at once.
    pub share: usize,
    /// Evaluations one lane may have waiting; more are refused at once.
    pub queue: usize,
    /// The threads' `nice` value (0: as the HTTP workers; higher: they yield
    /// the CPU to the HTTP workers when both want it).
    pub nice: i32,
}

/// How long an idle thread waits before it looks at its warm instances
/// (drops those of plugins that are gone).
const IDLE_SWEEP: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;

/// The plugin pool. Cloning shares it; the threads stop when the last clone
/// goes.
#[derive(Clone)]
pub struct PluginPool {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

struct Shared {
    queues: Mutex<Queues>,
    work: Condvar,
    size: PoolSize,
    /// Threads asleep on `work`. NB: changed only under the queues' lock,
    /// and read by `submit` after it released it, so a thread about to sleep
    /// is either seen here or sees the job.
    sleeping: AtomicUsize,
}

#[derive(Default)]
struct Queues {
    lanes: HashMap<Arc<str>, Lane>,
    /// Lanes with jobs waiting, in the order their turn comes.
    turns: VecDeque<Arc<str>>,
    stopping: bool,
}

#[derive(Default)]
struct Lane {
    running: usize,
    waiting: VecDeque<Job>,
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.lock().stopping = true;
        self.0.work.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        // NB: jobs run outside the lock and their panics are caught, so the
        // queues are never left half-changed.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PluginPool {
    /// Starts `size.threads` threads.
    pub fn new(size: PoolSize) -> std::io::Result<Self> {
        let size = PoolSize {
            threads: size.threads.max(1),
            share: size.share.clamp(1, size.threads.max(1)),
            queue: size.queue.max(1),
            nice: size.nice.clamp(0, 19),
        };
        let shared = Arc::new(Shared {
            queues: Mutex::default(),
            work: Condvar::new(),
            size,
            sleeping: AtomicUsize::new(0),
        });
        for n in 0..size.threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("flaghost-plugin-{n}"))
                // NB: as tokio's workers: wasmtime's host frames plus the
                // guest's stack (`max_wasm_stack`) must fit.
                .stack_size(4 << 20)
                .spawn(move || work(&shared))?;
        }
        Ok(Self {
            _stop: Arc::new(StopOnDrop(shared.clone())),
            shared,
        })
    }

    /// The pool's size.
    pub fn size(&self) -> PoolSize {
        self.shared.size
    }

    /// Runs `job` on a pool thread in `lane`'s turn and waits for its answer.
    /// If the caller stops waiting (its client went away) before the job's
    /// turn comes, the job is skipped.
    pub async fn run<T: Send + 'static>(
        &self,
        lane: &str,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let wrapped = move || {
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(job)));
        };
        self.submit(lane, Box::new(wrapped))?;
        match rx.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_panic)) => {
                warn!(plugin = lane, "an evaluation panicked on the plugin pool");
                Err(PoolError::Lost { lane: lane.into() })
            }
            Err(_) => Err(PoolError::Lost { lane: lane.into() }),
        }
    }

    fn submit(&self, lane: &str, job: Job) -> Result<(), PoolError> {
        let mut guard = self.shared.lock();
        let queues = &mut *guard;
        let key = match queues.lanes.get_key_value(lane) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = lane.into();
                queues.lanes.insert(key.clone(), Lane::default());
                key
            }
        };
        let Some(entry) = queues.lanes.get_mut(&key) else {
            unreachable!("the lane was found or inserted just above");
        };
        if entry.waiting.len() >= self.shared.size.queue {
            return Err(PoolError::Full {
                lane: lane.to_owned(),
                waiting: self.shared.size.queue,
            });
        }
        if entry.waiting.is_empty() {
            queues.turns.push_back(key);
        }
        entry.waiting.push_back(job);
        drop(guard);
        if self.shared.sleeping.load(Ordering::Acquire) > 0 {
            self.shared.work.notify_one();
        }
        Ok(())
    }
}

/// A pool thread: takes the next lane whose turn it is and that is under
/// its share, runs one of its jobs, and gives the lane's turn to the next.
fn work(shared: &Shared) {
    lower_priority(shared.size.nice);
    // Whether this thread may hold warm instances to sweep.
    let mut warm = true;
    loop {
        let (lane, job) = {
            let mut queues = shared.lock();
            // NB: a thread out of work sleeps at once. Watching for more
            // (50 µs) spared a futex wake per request of a steady stream, but
            // cost more CPU than it saved on a 2-core machine under load
            // (`cargo bench --bench load`, side by side: a reuse plugin flag
            // 20.3 µs CPU a request without it, 22.7 µs with; bulk of 50
            // 36 vs 40 µs), and it took a core from the HTTP workers.
            loop {
                if queues.stopping {
                    return;
                }
                if let Some(next) = take(&mut queues, shared.size.share) {
                    break next;
                }
                shared.sleeping.fetch_add(1, Ordering::AcqRel);
                // NB: with no warm instance left to sweep (the default
                // isolation keeps none), an idle thread sleeps until work
                // comes: nothing wakes it while flaghost is at rest.
                let timed_out = if warm {
                    let (guard, waited) = shared
                        .work
                        .wait_timeout(queues, IDLE_SWEEP)
                        .unwrap_or_else(PoisonError::into_inner);
                    queues = guard;
                    waited.timed_out()
                } else {
                    queues = shared
                        .work
                        .wait(queues)
                        .unwrap_or_else(PoisonError::into_inner);
                    false
                };
                shared.sleeping.fetch_sub(1, Ordering::AcqRel);
                if timed_out {
                    // NB: outside the lock: dropping stores gives pooled
                    // memory back, and callers must not wait for that.
                    drop(queues);
                    warm = super::instance::sweep_this_thread();
                    queues = shared.lock();
                }
            }
        };
        job();
        warm = true;
        let mut queues = shared.lock();
        let idle = match queues.lanes.get_mut(&lane) {
            Some(entry) => {
                entry.running -= 1;
                entry.running == 0 && entry.waiting.is_empty()
            }
            None => false,
        };
        if idle {
            queues.lanes.remove(&lane);
        }
        drop(queues);
        // A lane held at its share may now run another of its jobs.
        // NB: often this thread takes it itself, and the sleeper woken finds
        // nothing and sleeps again. Waking only for a job no thread would
        // take (here and in `submit`) was measured and not kept: side by
        // side (`LOAD_VARIANTS`, 2026-12-05), a plugin flag cost 45–49 µs
        // of CPU a request instead of 39–42, and bulk 50 168 instead of
        // 153, with less throughput; the threads kept awake answer sooner.
        if shared.sleeping.load(Ordering::Acquire) > 0 {
            shared.work.notify_one();
        }
    }
}

/// The next job to run: from the first lane in turn that is under its
/// share. That lane goes to the back of the turns if it has more waiting.
fn take(queues: &mut Queues, share: usize) -> Option<(Arc<str>, Job)> {
    let Queues { lanes, turns, .. } = queues;
    let at = turns
        .iter()
        .position(|lane| lanes.get(lane).is_some_and(|l| l.running < share))?;
    let lane = turns.remove(at)?;
    let entry = lanes.get_mut(&lane)?;
    let job = entry.waiting.pop_front()?;
    entry.running += 1;
    if !entry.waiting.is_empty() {
        turns.push_back(lane.clone());
    }
    Some((lane, job))
}

/// Lowers this thread's priority (Linux: `nice` is per thread).
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
            debug!(error = %e, "cannot lower the plugin thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize, share: usize, queue: usize) -> PluginPool {
        PluginPool::new(PoolSize {
            threads,
            share,
            queue,
            nice: 0,
        })
        .expect("threads start")
    }

    #[tokio::test]
    async fn a_lane_holds_its_share_and_others_take_their_turn() {
        let pool = pool(2, 1, 64);
        let hogging = Arc::new(AtomicUsize::new(0));
        let mut hogs = Vec::new();
        for _ in 0..8 {
            let (pool, hogging) = (pool.clone(), hogging.clone());
            hogs.push(tokio::spawn(async move {
                pool.run("hog", move || {
                    let now = hogging.fetch_add(1, Ordering::SeqCst) + 1;
                    std::thread::sleep(Duration::from_millis(30));
                    hogging.fetch_sub(1, Ordering::SeqCst);
                    now
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The hog's lane holds one thread; the other takes the neighbour's
        // turn while hogs still run and wait, not after them.
        let seen = hogging.clone();
        let hogs_running = pool
            .run("neighbour", move || seen.load(Ordering::SeqCst))
            .await
            .expect("runs");
        assert_eq!(hogs_running, 1, "the neighbour ran beside one hog");
        for hog in hogs {
            let most_at_once = hog.await.expect("joins").expect("runs");
            assert_eq!(most_at_once, 1, "the hog ran past its share");
        }
    }

    #[tokio::test]
    async fn a_full_lane_is_refused_at_once() {
        let pool = pool(1, 1, 2);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let mut held = Vec::new();
        for _ in 0..3 {
            let (pool, wait) = (pool.clone(), wait.clone());
            held.push(tokio::spawn(async move {
                pool.run("slow", move || {
                    let _ = wait.lock().map(|w| w.recv());
                })
                .await
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One runs, two wait: the queue is full.
        let refused = pool.run("slow", || ()).await;
        assert!(
            matches!(refused, Err(PoolError::Full { waiting: 2, .. })),
            "{refused:?}"
        );
        for _ in 0..3 {
            release.send(()).expect("sends");
        }
        for job in held {
            job.await.expect("joins").expect("ran");
        }
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_the_thread_lives_on() {
        let pool = pool(1, 1, 4);
        let lost = pool.run("p", || panic!("a bug")).await;
        assert!(matches!(lost, Err(PoolError::Lost { .. })), "{lost:?}");
        assert_eq!(pool.run("p", || 7).await.expect("runs"), 7);
    }
}
