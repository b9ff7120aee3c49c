//! The WASI functions a guest may call, answered so that an evaluation stays
//! a pure function of its inputs.
//!
//! Language runtimes call WASI as they start and run: Python reads its
//! environment, arguments and random bytes on its first call; JavaScript
//! reads the monotonic clock on every call. Trapping those made every
//! default Python or JavaScript build fail on its first call, so flaghost
//! links the interfaces below (through `wasmtime-wasi`, whose context takes
//! custom random, clock and output sources) with values that depend only on
//! the plugin, the flag and the evaluation:
//!
//! | import | answers |
//! | --- | --- |
//! | `wasi:cli/environment` | no variables, no arguments, no working directory |
//! | `wasi:cli/stdin` | an empty, closed stream |
//! | `wasi:cli/stdout`, `stderr` | a stream into the plugin's log (see [`Output`]) |
//! | `wasi:cli/exit` | ends the call as a trap |
//! | `wasi:cli/terminal-*` | not a terminal |
//! | `wasi:random/*` | bytes from a generator seeded anew for every call from the plugin's digest and the flag's key |
//! | `wasi:clocks/wall-clock` | the evaluation's `$flagd.timestamp` |
//! | `wasi:clocks/monotonic-clock` | a clock that does not move |
//! | `wasi:io/*` | streams over the above; `poll` and `pollable.block` trap (a rule must not wait) |
//! | `wasi:filesystem/*` | no preopened directories, so no file can be opened |
//!
//! Anything else (sockets, HTTP, later WASI versions) stays linked to a trap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_wasi::SeedableRng as _;
use rand_wasi::rngs::StdRng;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock, WasiClocks, WasiClocksView as _};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::sync as wasi;
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::HostState;

/// Bytes of what one call wrote to stdout and stderr that are kept: the
/// last ones (a traceback ends with the exception); earlier ones are dropped.
pub const OUTPUT_CAP: usize = 4 << 10;

/// WASI resources (streams, pollables) one instance may hold at once: a
/// runtime holds a handful; without a bound a guest creating pollables in a
/// loop grows host memory, and in a reused instance across calls.
const MAX_RESOURCES: usize = 1024;

/// Most random bytes one `get-random-bytes` call may ask for: the host
/// allocates them before the guest's memory cap can refuse them
/// (`wasmtime-wasi` allows 64 MiB). Runtimes ask for a few dozen.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// The interfaces flaghost answers, by name without version: a component's
/// import of any 0.2 version of them is linked to flaghost's.
const PROVIDED: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:filesystem/preopens",
    "wasi:filesystem/types",
];

/// Where `wasmtime-wasi` defines `wasi:io/poll` (its WIT's version).
const POLL: &str = "wasi:io/poll@0.2.12";

/// Whether `import` (`wasi:cli/environment@0.2.9`) is one flaghost answers.
pub fn provides(import: &str) -> bool {
    import
        .split_once('@')
        .is_some_and(|(name, version)| PROVIDED.contains(&name) && version.starts_with("0.2."))
}

/// Links the interfaces in [`PROVIDED`] into `linker`.
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
    let l = linker;
    clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    filesystem::preopens::add_to_linker::<_, WasiFilesystem>(l, HostState::filesystem)?;
    wasi::filesystem::types::add_to_linker::<_, WasiFilesystem>(l, HostState::filesystem)?;
    random::random::add_to_linker::<_, WasiRandom>(l, |s| s.wasi.ctx.random())?;
    random::insecure::add_to_linker::<_, WasiRandom>(l, |s| s.wasi.ctx.random())?;
    random::insecure_seed::add_to_linker::<_, WasiRandom>(l, |s| s.wasi.ctx.random())?;
    cli::exit::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<_, Table>(l, |s| {
        &mut s.wasi.table
    })?;
    wasi::io::poll::add_to_linker::<_, Table>(l, |s| &mut s.wasi.table)?;
    wasi::io::streams::add_to_linker::<_, Table>(l, |s| &mut s.wasi.table)?;

    // NB: waiting is the one thing that cannot be made deterministic (and
    // would hold a plugin thread on the host's clock, out of the epoch
    // deadline's reach): the two functions that wait trap instead.
    l.allow_shadowing(true);
    let mut poll = l.instance(POLL)?;
    poll.func_wrap(
        "poll",
        |_, (_,): (Vec<Resource<DynPollable>>,)| -> wasmtime::Result<(Vec<u32>,)> {
            wasmtime::bail!(
                "{POLL}#poll: a targeting rule must not wait (flaghost answers every call at once)"
            )
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |_, (_,): (Resource<DynPollable>,)| -> wasmtime::Result<()> {
            wasmtime::bail!("{POLL}#[method]pollable.block: a targeting rule must not wait (flaghost answers every call at once)")
        },
    )?;
    l.allow_shadowing(false);
    Ok(())
}

/// Links every import of `component` that neither the contract nor the
/// interfaces above answer to a function that traps when called, so a rule
/// that never calls them runs.
///
/// NB: not wasmtime's `define_unknown_imports_as_traps`, which stubs by exact
/// name: an import of `wasi:io/poll@0.2.10` (beside flaghost's 0.2.12, which
/// the linker would match by semver) got a stub `pollable` of its own, and a
/// component that shares one `pollable` between its 0.2.10 and 0.2.12
/// imports (a JavaScript build does) was refused for mismatched resource
/// types. Here provided interfaces are left to the linker's semver match,
/// and a stubbed interface's resource that is one of the provided ones (an
/// HTTP interface `use`s `pollable` and the streams) gets the host type the
/// provided interface has.
pub(super) fn stub_the_rest(
    linker: &mut Linker<HostState>,
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime::component::types::ComponentItem;

    let answered = |name: &str| provides(name) || name.starts_with("flaghost:rules/");
    let imports: Vec<(String, ComponentItem)> = component
        .component_type()
        .imports(engine)
        .map(|(name, item)| (name.to_owned(), item.ty))
        .collect();
    // The provided resources, as the component's types name them.
    let mut shared: Vec<(ResourceType, ResourceType)> = Vec::new();
    for (_, item) in imports.iter().filter(|(name, _)| answered(name)) {
        let ComponentItem::ComponentInstance(instance) = item else {
            continue;
        };
        for (export, item) in instance.exports(engine) {
            if let (ComponentItem::Resource(abstract_type), Some(host)) =
                (item.ty, host_resource(export))
            {
                shared.push((abstract_type, host));
            }
        }
    }
    let resource_for = |abstract_type: &ResourceType| {
        shared
            .iter()
            .find(|(a, _)| a == abstract_type)
            .map_or(ResourceType::host::<()>(), |(_, host)| *host)
    };
    let trap = |name: String| {
        move |_: wasmtime::StoreContextMut<'_, HostState>,
              _: wasmtime::component::types::ComponentFunc,
              _: &[wasmtime::component::Val],
              _: &mut [wasmtime::component::Val]|
              -> wasmtime::Result<()> {
            wasmtime::bail!("unknown import: `{name}` has not been defined")
        }
    };
    for (name, item) in imports.iter().filter(|(name, _)| !answered(name)) {
        match item {
            ComponentItem::ComponentInstance(instance) => {
                let mut stub = linker.instance(name)?;
                for (export, item) in instance.exports(engine) {
                    match item.ty {
                        ComponentItem::ComponentFunc(_) => {
                            stub.func_new(export, trap(format!("{name}#{export}")))?;
                        }
                        ComponentItem::Resource(abstract_type) => {
                            stub.resource(export, resource_for(&abstract_type), |_, _| Ok(()))?;
                        }
                        _ => {}
                    }
                }
            }
            ComponentItem::ComponentFunc(_) => {
                linker.root().func_new(name, trap(name.clone()))?;
            }
            ComponentItem::Resource(abstract_type) => {
                linker
                    .root()
                    .resource(name, resource_for(abstract_type), |_, _| Ok(()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The host type of a resource the provided interfaces define, by name
/// (the names are distinct across them).
fn host_resource(name: &str) -> Option<wasmtime::component::ResourceType> {
    use wasmtime::component::ResourceType;
    Some(match name {
        "pollable" => ResourceType::host::<DynPollable>(),
        "input-stream" => ResourceType::host::<wasmtime_wasi::p2::DynInputStream>(),
        "output-stream" => ResourceType::host::<wasmtime_wasi::p2::DynOutputStream>(),
        "error" => ResourceType::host::<wasmtime_wasi::p2::IoError>(),
        "descriptor" => ResourceType::host::<wasmtime_wasi::filesystem::Descriptor>(),
        "directory-entry-stream" => ResourceType::host::<wasmtime_wasi::p2::ReaddirIterator>(),
        _ => return None,
    })
}

/// `wasi:io` reaches the resource table alone.
struct Table;

impl wasmtime::component::HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// One store's WASI: the context `wasmtime-wasi` reads, its resources, and
/// the per-call values flaghost sets ([`Guest::begin`]).
pub(super) struct Guest {
    ctx: WasiCtx,
    table: ResourceTable,
    call: Arc<Call>,
}

/// What the WASI sources of one store read, set before each call.
struct Call {
    random: Mutex<StdRng>,
    /// Seconds since the Unix epoch of the evaluation (`$flagd.timestamp`).
    now: AtomicU64,
    output: Mutex<Output>,
}

impl Guest {
    /// A store's WASI, its insecure seed from `insecure_seed` (the plugin's:
    /// the same for every store of the plugin).
    pub fn new(insecure_seed: u128) -> Self {
        let call = Arc::new(Call {
            random: Mutex::new(StdRng::from_seed([0; 32])),
            now: AtomicU64::new(0),
            output: Mutex::new(Output::default()),
        });
        let ctx = WasiCtx::builder()
            .secure_random(Random(call.clone()))
            .insecure_random(Random(call.clone()))
            .insecure_random_seed(insecure_seed)
            .wall_clock(Wall(call.clone()))
            .monotonic_clock(Still)
            .stdout(Capture(call.clone()))
            .stderr(Capture(call.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self { ctx, table, call }
    }

    /// Sets what the next call's WASI answers: random bytes from `seed`,
    /// the wall clock at `now` (Unix seconds), no output yet.
    pub fn begin(&self, seed: [u8; 32], now: u64) {
        *lock(&self.call.random) = StdRng::from_seed(seed);
        self.call.now.store(now, Ordering::Relaxed);
        lock(&self.call.output).clear();
    }

    /// What the call wrote to stdout and stderr, if anything: its last
    /// [`OUTPUT_CAP`] bytes, lossily decoded.
    pub fn take_output(&self) -> Option<String> {
        lock(&self.call.output).take()
    }
}

/// A lock that a panic elsewhere does not poison for good.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The random sources: the call's generator.
struct Random(Arc<Call>);

impl rand_wasi::TryRng for Random {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        lock(&self.0.random).try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        lock(&self.0.random).try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        lock(&self.0.random).try_fill_bytes(dst)
    }
}

/// The wall clock: the evaluation's time.
struct Wall(Arc<Call>);

impl HostWallClock for Wall {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::from_secs(self.0.now.load(Ordering::Relaxed))
    }
}

/// The monotonic clock: it does not move.
struct Still;

impl HostMonotonicClock for Still {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        0
    }
}

/// What a call wrote to stdout and stderr, interleaved as written: its last
/// [`OUTPUT_CAP`] bytes and how many came before them.
#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Output {
    fn clear(&mut self) {
        self.bytes.clear();
        self.dropped = 0;
    }

    fn write(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        // NB: trimmed in steps of a cap, not per write, so a guest writing a
        // byte at a time costs no quadratic copying.
        if self.bytes.len() > 2 * OUTPUT_CAP {
            let cut = self.bytes.len() - OUTPUT_CAP;
            self.bytes.drain(..cut);
            self.dropped += cut;
        }
    }

    fn take(&mut self) -> Option<String> {
        if self.bytes.is_empty() {
            return None;
        }
        let cut = self.bytes.len().saturating_sub(OUTPUT_CAP);
        let dropped = self.dropped + cut;
        let text = String::from_utf8_lossy(&self.bytes[cut..]);
        let text = text.trim_end();
        let text = if dropped > 0 {
            format!("[{dropped} earlier bytes dropped]…{text}")
        } else {
            text.to_owned()
        };
        self.clear();
        Some(text)
    }
}

/// stdout and stderr: always ready, never full, into the call's [`Output`].
#[derive(Clone)]
struct Capture(Arc<Call>);

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        lock(&self.0.output).write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_CAP)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        lock(&self.0.output).write(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provides_every_0_2_version_of_its_interfaces_and_nothing_else() {
        assert!(provides("wasi:cli/environment@0.2.9"));
        assert!(provides("wasi:io/poll@0.2.0"));
        assert!(!provides("wasi:cli/environment@0.3.0"));
        assert!(!provides("wasi:sockets/tcp@0.2.9"));
        assert!(!provides("wasi:http/outgoing-handler@0.2.9"));
        assert!(!provides("wasi:cli/environment"));
    }

    #[test]
    fn output_keeps_the_last_bytes_and_counts_the_rest() {
        let mut out = Output::default();
        assert_eq!(out.take(), None);
        for _ in 0..3 * OUTPUT_CAP {
            out.write(b"x");
        }
        out.write(b"the end\n");
        let text = out.take().expect("output");
        assert!(text.ends_with("the end"), "{text}");
        assert!(
            text.starts_with(&format!("[{} earlier bytes dropped]", 2 * OUTPUT_CAP + 8)),
            "{text}"
        );
        assert_eq!(out.take(), None, "taken once");
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let guest = Guest::new(7);
        let mut random = Random(guest.call.clone());
        let mut draw = |seed| {
            guest.begin(seed, 0);
            let mut bytes = [0u8; 16];
            rand_wasi::TryRng::try_fill_bytes(&mut random, &mut bytes).expect("infallible");
            bytes
        };
        assert_eq!(draw([1; 32]), draw([1; 32]));
        assert_ne!(draw([1; 32]), draw([2; 32]));
    }
}
