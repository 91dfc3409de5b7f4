//! Transfer benchmark: bandwidth of 1, 16 and 256 blocks of the 109M-parameter model's KV
//! layout (SmolLM2-135M shapes: 30 layers, 3 kv heads, head dim 64, 16-token blocks, f32:
//! 720 KiB a block) over shared memory and TCP loopback, each against its reference measured
//! in the same run (a plain `memcpy` of the same bytes; one plain socket blasting the same
//! bytes and waiting for a one-byte acknowledgement), measured in alternation with the transfer
//! (best of each over the rounds), and the latency of a one-block transfer.
//! Prints a markdown table. Run it with `scripts/bench-transfer` (release build).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dynamo_transfer::{Agent, AgentSettings, Dtype, Layout, Route, Source, WriteOp};

const LAYOUT: Layout = Layout {
    layers: 30,
    kv_heads: 3,
    head_dim: 64,
    block_size: 16,
    dtype: Dtype::F32,
};
const SIZES: [usize; 3] = [1, 16, 256];

/// Rounds per size: each round measures the reference and the transfer once, back to back,
/// so drift on a shared machine hits both; the best of each is kept.
fn rounds(blocks: usize) -> usize {
    if blocks >= 256 {
        9
    } else {
        200
    }
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// A plain `memcpy` of `bytes` (one copy between two buffers).
struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    fn new(bytes: usize) -> Self {
        Self {
            src: vec![7u8; bytes],
            dst: vec![0u8; bytes],
        }
    }

    fn once(&mut self) -> Duration {
        let t = Instant::now();
        self.dst.copy_from_slice(std::hint::black_box(&self.src));
        std::hint::black_box(&self.dst);
        t.elapsed()
    }
}

/// One plain blocking socket: the writer sends everything, the reader (its own thread) reads
/// it all into a buffer and acknowledges with one byte.
struct Blast {
    stream: TcpStream,
    data: Vec<u8>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Blast {
    fn new(bytes: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = vec![0u8; bytes];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&[1]).is_err() {
                    break;
                }
            }
        });
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            data: vec![3u8; bytes],
            reader: Some(reader),
        }
    }

    fn once(&mut self) -> Duration {
        let t = Instant::now();
        self.stream.write_all(&self.data).unwrap();
        let mut ack = [0u8; 1];
        self.stream.read_exact(&mut ack).unwrap();
        t.elapsed()
    }
}

impl Drop for Blast {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn agents(route: Route) -> (Agent, Agent) {
    let settings = || AgentSettings {
        name: "bench".into(),
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        route,
        tcp_connections: 4,
        timeout: Duration::from_secs(60),
    };
    (
        Agent::start(settings()).unwrap(),
        Agent::start(settings()).unwrap(),
    )
}

/// Two agents and `blocks` blocks to write from one to the other.
struct Transfer {
    a: Agent,
    _b: Agent,
    meta: dynamo_transfer::AgentMetadata,
    ops: Vec<WriteOp>,
    _regions: (
        std::sync::Arc<dynamo_transfer::Region>,
        std::sync::Arc<dynamo_transfer::Region>,
    ),
}

impl Transfer {
    async fn new(route: Route, blocks: usize) -> Self {
        let (a, b) = agents(route);
        let src = a.register(LAYOUT, blocks).unwrap();
        let dst = b.register(LAYOUT, blocks).unwrap();
        src.write(0, &vec![5u8; src.len()]).unwrap();
        let meta = b.metadata();
        let ops = (0..blocks)
            .map(|i| WriteOp {
                src: Source::Region(src.block(i)),
                dst: dst.block(i),
            })
            .collect::<Vec<_>>();
        let t = Self {
            a,
            _b: b,
            meta,
            ops,
            _regions: (src, dst),
        };
        t.once().await; // connect and map once
        t
    }

    async fn once(&self) -> Duration {
        let t = Instant::now();
        self.a
            .write(&self.meta, LAYOUT, self.ops.clone())
            .await
            .unwrap();
        t.elapsed()
    }
}

async fn latency(route: Route) -> (Duration, Duration) {
    let (a, b) = agents(route);
    let src = a.register(LAYOUT, 1).unwrap();
    let dst = b.register(LAYOUT, 1).unwrap();
    let meta = b.metadata();
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for i in 0..1100 {
        let t = Instant::now();
        a.write(
            &meta,
            LAYOUT,
            vec![WriteOp {
                src: Source::Region(src.block(0)),
                dst: dst.block(0),
            }],
        )
        .await
        .unwrap();
        if i >= 100 {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    (
        Duration::from_nanos(h.value_at_quantile(0.5)),
        Duration::from_nanos(h.value_at_quantile(0.99)),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "Machine: {cpu}, {} cores. Block: {} ({} bytes).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        LAYOUT,
        LAYOUT.block_bytes()
    );
    println!("| backend | blocks | bytes | GB/s | reference | reference GB/s | of reference |");
    println!("|---|---:|---:|---:|---|---:|---:|");
    for blocks in SIZES {
        let bytes = blocks * LAYOUT.block_bytes();
        eprintln!("measuring {blocks} blocks ({bytes} bytes)...");
        let (mut m, s) = (Memcpy::new(bytes), Transfer::new(Route::Shm, blocks).await);
        let (mut best_m, mut best_s) = (Duration::MAX, Duration::MAX);
        for _ in 0..rounds(blocks) {
            best_m = best_m.min(m.once());
            best_s = best_s.min(s.once().await);
        }
        drop((m, s));
        let (mut raw, t) = (Blast::new(bytes), Transfer::new(Route::Tcp, blocks).await);
        let (mut best_r, mut best_t) = (Duration::MAX, Duration::MAX);
        for _ in 0..rounds(blocks) {
            best_r = best_r.min(tokio::task::block_in_place(|| raw.once()));
            best_t = best_t.min(t.once().await);
        }
        for (name, d, rname, r) in [
            ("shm", best_s, "memcpy", best_m),
            ("tcp", best_t, "one socket", best_r),
        ] {
            println!(
                "| {name} | {blocks} | {bytes} | {:.2} | {rname} | {:.2} | {:.0}% |",
                gbps(bytes, d),
                gbps(bytes, r),
                100.0 * r.as_secs_f64() / d.as_secs_f64()
            );
        }
    }
    println!("\nOne-block transfer latency (1000 transfers after 100 of warm-up):\n");
    println!("| backend | p50 | p99 |");
    println!("|---|---:|---:|");
    for (name, route) in [("shm", Route::Shm), ("tcp", Route::Tcp)] {
        eprintln!("measuring {name} latency...");
        let (p50, p99) = latency(route).await;
        println!("| {name} | {p50:.1?} | {p99:.1?} |");
    }
}
