//! Compiling components under a bound: in a child process of flaghost, with
//! CPU-time and address-space limits, off the service's threads.
//!
//! Why a process and not a thread with a timeout: Cranelift cannot be
//! interrupted, and its memory is the process's. A component built to be
//! expensive to compile (a function that keeps 50,000 values live took 51 s
//! and grew without bound) would otherwise hold a core and memory of the
//! service for as long as it likes, and a compiler crash (a stack overflow
//! on a deeply nested function) would take the service down. A child
//! (`flaghost compile-worker`, the running binary itself) gets
//! `RLIMIT_CPU` and `RLIMIT_AS`, runs at a lower priority than the service,
//! and dies alone; the parent gives up on it past a wall-clock bound too.
//!
//! Protocol: the component's bytes on the child's stdin; the serialized
//! artifact (`ARTIFACT_MAGIC` then `Engine::precompile_component`'s output)
//! on its stdout, exit 0; a component the compiler refuses: its reason on
//! stderr, exit `EXIT_REFUSED`. The parent deserializes the artifact with
//! an engine of the same compilation settings (`runtime`'s
//! `engine_config`); wasmtime checks that they match.
//!
//! The child compiles with the default (on-demand) allocator: it never
//! instantiates, and the parent's pooling allocator would reserve terabytes
//! of address space that `RLIMIT_AS` would refuse.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::Component;

/// The subcommand a child compiler runs (hidden from `--help`).
pub const WORKER_COMMAND: &str = "compile-worker";

/// First bytes of a child's answer: a binary that is not flaghost (or not
/// this version of its protocol) is told apart from a compiler that failed.
const ARTIFACT_MAGIC: &[u8] = b"flaghost-artifact-v1\n";

/// The child's exit code when the compiler refuses the component
/// (`EX_DATAERR`; not 2, which clap uses for a usage error).
const EXIT_REFUSED: u8 = 65;

/// The child's exit code when it cannot set itself up (`EX_OSERR`): not
/// the component's fault.
const EXIT_SETUP: u8 = 71;

/// Most of a child's stderr kept for a message.
const MAX_MESSAGE_BYTES: usize = 2048;

/// How the parent waits between looks at a running child.
const POLL: Duration = Duration::from_millis(5);

/// Priority of a child compiler below the service's threads: compiling is
/// never as urgent as an evaluation.
const WORKER_NICE: i32 = 10;

/// Default CPU time one compile may use.
///
/// Measured (release build, this 2-core machine, 2026-12-02, `/usr/bin/time`
/// around `flaghost compile-worker`): the largest plugins expected are
/// runtimes built by componentize-js (12.0 MB: 16.3 s of CPU, 8.7 s wall)
/// and componentize-py (18.4 MB: 12.1 s of CPU, 6.6 s wall). 60 s leaves
/// 3.7× over the larger.
pub const DEFAULT_CPU: Duration = Duration::from_secs(60);

/// Default address space one compile may use: the same two components
/// compile in 448 MiB and not in 384 MiB (peak RSS 340–366 MB); 2 GiB
/// leaves 4.5× over that.
pub const DEFAULT_MEMORY_BYTES: u64 = 2 << 30;

/// Where and under what bound components are compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compiler {
    /// In a child process running this flaghost binary's `compile-worker`,
    /// under the bound of [`super::Limits`] (`compile_cpu`,
    /// `compile_memory_bytes`).
    Child(PathBuf),
    /// In this process, on the calling thread, with no bound. For embedders
    /// and benches that have no flaghost binary at hand; never the server's
    /// choice.
    InProcess,
}

impl Compiler {
    /// Children running the binary of this process (which must be
    /// `flaghost`). On Linux `/proc/self/exe`, which stays this very binary
    /// even when the file on disk is replaced by an upgrade: a newer binary
    /// could write artifacts this one refuses.
    pub fn this_binary() -> std::io::Result<Self> {
        let proc_exe = PathBuf::from("/proc/self/exe");
        if proc_exe.exists() {
            return Ok(Self::Child(proc_exe));
        }
        std::env::current_exe().map(Self::Child)
    }

    /// The serialized artifact of `bytes`, compiled for `engine` under
    /// `bound`.
    pub(super) fn compile(
        &self,
        engine: &Engine,
        settings: &Settings,
        bytes: &[u8],
    ) -> Result<Vec<u8>, CompileError> {
        match self {
            Self::InProcess => engine
                .precompile_component(bytes)
                .map_err(|e| CompileError::Refused(format!("{e:#}"))),
            Self::Child(exe) => compile_in_child(exe, settings, bytes),
        }
    }
}

/// What a child needs to compile as the parent's engine does, and its bound.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// `Config::max_wasm_stack`.
    pub wasm_stack_bytes: usize,
    /// `RLIMIT_CPU`.
    pub cpu: Duration,
    /// `RLIMIT_AS`.
    pub memory_bytes: u64,
}

impl Settings {
    /// How long the parent waits for a child in all: its CPU bound is what
    /// counts, so this only catches a child that is stuck rather than
    /// working (a starved machine makes a compile slow, not expensive).
    fn wall(&self) -> Duration {
        self.cpu * 4 + Duration::from_secs(10)
    }
}

/// Why a component was not compiled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CompileError {
    /// The compiler refused it (not valid WebAssembly, an unsupported
    /// feature...).
    #[error("not a valid component: {0}")]
    Refused(String),
    /// Compiling it used all the CPU time it may.
    #[error(
        "compiling it used more than its bound of {} s of CPU time (--plugin-compile-cpu-secs); \
         it was stopped. A plugin this expensive to compile is refused"
    , .0.as_secs())]
    Cpu(Duration),
    /// Compiling it did not finish in time though it had CPU time left.
    #[error("compiling it did not finish within {} s; it was stopped", .0.as_secs())]
    Wall(Duration),
    /// Compiling it needed more memory than it may use.
    #[error(
        "compiling it needed more than its bound of {} MiB of memory (--plugin-compile-memory-mib); \
         it was stopped ({message})"
    , .memory_bytes >> 20)]
    Memory {
        /// The bound.
        memory_bytes: u64,
        /// What the compiler said.
        message: String,
    },
    /// The compiler died otherwise (a crash on this input).
    #[error("the compiler stopped ({how}) on this component{}", detail(.message))]
    Crashed {
        /// How the child ended.
        how: String,
        /// What it printed, if anything.
        message: String,
    },
    /// The child could not be run or did not answer as a compiler.
    #[error("the compiler process failed: {0}")]
    Process(String),
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// Runs one compile in a child and waits for it, within [`Settings::wall`].
fn compile_in_child(
    exe: &std::path::Path,
    settings: &Settings,
    bytes: &[u8],
) -> Result<Vec<u8>, CompileError> {
    let process = |what: &str, e: std::io::Error| {
        CompileError::Process(format!("{what} {}: {e}", exe.display()))
    };
    let mut child = Command::new(exe)
        .arg(WORKER_COMMAND)
        .arg("--cpu-secs")
        .arg(settings.cpu.as_secs().max(1).to_string())
        .arg("--memory-bytes")
        .arg(settings.memory_bytes.to_string())
        .arg("--wasm-stack-bytes")
        .arg(settings.wasm_stack_bytes.to_string())
        // NB: nothing of the service's environment (its Redis URL, its admin
        // token) reaches the process that reads untrusted bytes. Two malloc
        // arenas (a glibc build; jemalloc runs with one, see main.rs): each
        // glibc arena reserves 64 MiB of address space per thread,
        // which would count toward RLIMIT_AS without being used (measured:
        // the bound then failed or passed by thread timing).
        .env_clear()
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| process("cannot start", e))?;
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    // An artifact is never larger than the child's address space.
    let max_artifact = settings.memory_bytes;
    let started = Instant::now();
    std::thread::scope(|scope| {
        // NB: stdin, stdout and stderr each on a thread of their own: a child
        // that fills one pipe while the parent writes another never stalls.
        scope.spawn(move || {
            if let Some(mut stdin) = stdin {
                // A child that died early closes the pipe: its exit says why.
                let _ = stdin.write_all(bytes);
            }
        });
        let artifact = scope.spawn(move || {
            let mut out = Vec::new();
            stdout.map(|s| s.take(max_artifact).read_to_end(&mut out));
            out
        });
        let message = scope.spawn(move || {
            let mut err = Vec::new();
            stderr.map(|s| s.take(64 << 10).read_to_end(&mut err));
            super::cut(String::from_utf8_lossy(&err).trim(), MAX_MESSAGE_BYTES)
        });
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if started.elapsed() > settings.wall() => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(CompileError::Wall(settings.wall()));
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(process("cannot wait for", e));
                }
            }
        };
        let artifact = artifact.join().unwrap_or_default();
        let message = message.join().unwrap_or_default();
        outcome(status?, artifact, message, settings)
    })
}

/// What a child's exit means.
fn outcome(
    status: std::process::ExitStatus,
    artifact: Vec<u8>,
    message: String,
    settings: &Settings,
) -> Result<Vec<u8>, CompileError> {
    use std::os::unix::process::ExitStatusExt as _;
    if status.success() {
        let mut artifact = artifact;
        if !artifact.starts_with(ARTIFACT_MAGIC) {
            return Err(CompileError::Process(
                "it exited without an artifact: is the compiler binary flaghost, of this version?"
                    .into(),
            ));
        }
        artifact.drain(..ARTIFACT_MAGIC.len());
        return Ok(artifact);
    }
    use rustix::process::Signal;
    // RLIMIT_CPU: SIGXCPU at the soft limit (its default action ends the
    // process; SIGKILL at the hard limit a second later only if it were
    // handled, and flaghost does not handle it). A SIGKILL is someone
    // else's: the kernel's out-of-memory killer, or an operator.
    if status.signal() == Some(Signal::XCPU.as_raw()) {
        return Err(CompileError::Cpu(settings.cpu));
    }
    if status.code() == Some(i32::from(EXIT_SETUP)) {
        return Err(CompileError::Process(message));
    }
    // RLIMIT_AS: an allocation fails. Rust aborts ("memory allocation of N
    // bytes failed"); an error wasmtime returns says "out of memory" or
    // "Cannot allocate memory" (and the child exits as if the component
    // were refused). The first line says which.
    let first = message.lines().next().unwrap_or_default().to_owned();
    let lowered = first.to_lowercase();
    if [
        "memory allocation of",
        "out of memory",
        "cannot allocate memory",
    ]
    .iter()
    .any(|m| lowered.contains(m))
    {
        return Err(CompileError::Memory {
            memory_bytes: settings.memory_bytes,
            message: first,
        });
    }
    if status.code() == Some(i32::from(EXIT_REFUSED)) {
        return Err(CompileError::Refused(message));
    }
    let how = match status.signal() {
        Some(signal) => format!("signal {signal}"),
        None => format!("exit code {}", status.code().unwrap_or(-1)),
    };
    Err(CompileError::Crashed {
        how,
        message: first,
    })
}

/// Arguments of `flaghost compile-worker` (internal: run by flaghost itself).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// `RLIMIT_CPU`, in seconds.
    #[arg(long)]
    pub cpu_secs: u64,
    /// `RLIMIT_AS`, in bytes.
    #[arg(long)]
    pub memory_bytes: u64,
    /// The parent engine's `max_wasm_stack`.
    #[arg(long)]
    pub wasm_stack_bytes: usize,
}

/// `flaghost compile-worker`: bounds itself, reads a component on stdin,
/// writes its artifact on stdout.
pub fn worker(args: &WorkerArgs) -> ExitCode {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // NB: the bound before anything reads the untrusted bytes. A bound
    // already lower (an operator's `ulimit`, systemd's `LimitCPU=`)
    // is kept: a process may lower its limits, never raise them.
    let lowered = |resource: Resource, soft: u64, hard: u64| {
        let inherited = getrlimit(resource).maximum.unwrap_or(u64::MAX);
        setrlimit(
            resource,
            Rlimit {
                current: Some(soft.min(inherited)),
                maximum: Some(hard.min(inherited)),
            },
        )
    };
    // NB: the compiler's threads (wasmtime compiles functions on rayon's
    // global pool) start before the address-space bound, at the lower
    // priority they keep: their stacks are fixed, not the component's doing,
    // and a pool that could not start under a small bound panicked inside
    // rayon instead of failing an allocation that names the bound (seen
    // once jemalloc, whose reservations leave less room, was the allocator).
    let _ = rustix::process::setpriority_process(None, WORKER_NICE);
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    let bounded = lowered(Resource::Cpu, args.cpu_secs, args.cpu_secs + 1)
        .and_then(|()| lowered(Resource::As, args.memory_bytes, args.memory_bytes))
        .and_then(|()| lowered(Resource::Core, 0, 0));
    if let Err(e) = bounded {
        eprintln!("cannot set the compile bound: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    // A compile outlives no flaghost: killed if the thread that started it
    // goes (that thread waits for it, so only with the process).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));

    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("cannot read the component: {e}");
        return ExitCode::FAILURE;
    }
    let engine = match Engine::new(&super::runtime::engine_config(args.wasm_stack_bytes)) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("cannot build the engine: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let artifact = match engine.precompile_component(&bytes) {
        Ok(artifact) => artifact,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(ARTIFACT_MAGIC)
        .and_then(|()| stdout.write_all(&artifact))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the artifact: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A component from an artifact [`Compiler::compile`] made.
#[allow(unsafe_code)]
pub(super) fn component(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` trusts the bytes to be wasmtime's own
    // serialization. They are: `Engine::precompile_component`'s output,
    // made in this process or by a child running this very binary
    // (`/proc/self/exe`), passed through a pipe only the two hold. The
    // untrusted component went into the compiler, not into these bytes;
    // wasmtime still checks the header and that the compilation settings
    // match this engine's.
    unsafe { Component::deserialize(engine, artifact) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = super::super::cut(&message, MAX_MESSAGE_BYTES);
        let (kept, rest) = cut.split_once('…').expect("marked as cut");
        assert!(kept.len() <= MAX_MESSAGE_BYTES && message.starts_with(kept));
        assert_eq!(rest, format!(" ({} bytes in all)", message.len()));
        assert_eq!(super::super::cut("short", MAX_MESSAGE_BYTES), "short");
    }

    fn settings() -> Settings {
        Settings {
            wasm_stack_bytes: 512 << 10,
            cpu: Duration::from_secs(5),
            memory_bytes: 1 << 30,
        }
    }

    #[test]
    fn a_child_s_end_says_which_bound_it_reached() {
        use std::os::unix::process::ExitStatusExt as _;
        use std::process::ExitStatus;
        let end = |raw: i32, message: &str| {
            outcome(
                ExitStatus::from_raw(raw),
                Vec::new(),
                message.into(),
                &settings(),
            )
            .expect_err("not compiled")
            .to_string()
        };
        // Wait statuses: a signal in the low bits, an exit code shifted by 8.
        let cpu = end(24, "");
        assert!(cpu.contains("5 s of CPU time") && cpu.contains("--plugin-compile-cpu-secs"));
        let memory = end(
            6,
            "memory allocation of 2228240 bytes failed\nnote: run with RUST_BACKTRACE=1",
        );
        assert!(
            memory.contains("1024 MiB") && memory.contains("--plugin-compile-memory-mib"),
            "{memory}"
        );
        assert!(
            !memory.contains("RUST_BACKTRACE"),
            "first line only: {memory}"
        );
        let memory = end(1 << 8, "cannot read the component: out of memory");
        assert!(memory.contains("--plugin-compile-memory-mib"), "{memory}");
        let refused = end(i32::from(EXIT_REFUSED) << 8, "failed to parse WebAssembly");
        assert!(
            refused.starts_with("not a valid component: failed to parse"),
            "{refused}"
        );
        let crashed = end(11, "thread 'main' has overflowed its stack");
        assert!(
            crashed.contains("signal 11") && crashed.contains("overflowed"),
            "{crashed}"
        );
        // SIGKILL is not the CPU bound's (SIGXCPU ends the child first).
        assert!(end(9, "").contains("signal 9"));
        let setup = end(
            i32::from(EXIT_SETUP) << 8,
            "cannot set the compile bound: EPERM",
        );
        assert!(setup.starts_with("the compiler process failed"), "{setup}");
        // An allocation failure wasmtime returns as an error is the bound's.
        let memory = end(
            i32::from(EXIT_REFUSED) << 8,
            "Cannot allocate memory (os error 12)",
        );
        assert!(memory.contains("--plugin-compile-memory-mib"), "{memory}");
    }

    #[test]
    fn a_binary_that_is_not_a_compiler_is_named_as_such() {
        // `true` exits 0 with nothing on stdout.
        let settings = settings();
        let err = compile_in_child(std::path::Path::new("true"), &settings, b"\0asm")
            .expect_err("no artifact");
        assert!(err.to_string().contains("without an artifact"), "{err}");
        let err = compile_in_child(
            std::path::Path::new("/nonexistent/flaghost"),
            &settings,
            b"",
        )
        .expect_err("no binary");
        assert!(err.to_string().contains("cannot start"), "{err}");
    }
}
