//! Transfer benchmark: bandwidth of 1, 16 and 256 blocks of the 109M-parameter model's KV
//! layout (SmolLM2-135M shapes: 30 layers, 3 kv heads, head dim 64, 16-token blocks, f32:
//! 720 KiB a block) over shared memory and TCP loopback, each against its reference measured
//! in the same run (a plain `memcpy` of the same bytes; one plain socket blasting the same
//! bytes and waiting for a one-byte acknowledgement), and the latency of a one-block transfer.
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

fn best(reps: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..reps).map(|_| f()).min().expect("reps > 0")
}

fn reps(blocks: usize) -> usize {
    if blocks >= 256 {
        7
    } else {
        50
    }
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn memcpy(bytes: usize) -> Duration {
    let src = vec![7u8; bytes];
    let mut dst = vec![0u8; bytes];
    best(reps(bytes / LAYOUT.block_bytes()), || {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        t.elapsed()
    })
}

/// One blocking socket: write everything, the reader reads it all and acknowledges.
fn socket_blast(bytes: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let n = reps(bytes / LAYOUT.block_bytes());
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; bytes];
        for _ in 0..n {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&[1]).unwrap();
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let data = vec![3u8; bytes];
    let d = best(n, || {
        let t = Instant::now();
        s.write_all(&data).unwrap();
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).unwrap();
        t.elapsed()
    });
    reader.join().unwrap();
    d
}

async fn agents(route: Route) -> (Agent, Agent) {
    let settings = || AgentSettings {
        name: "bench".into(),
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        route,
        tcp_connections: 4,
        timeout: Duration::from_secs(60),
    };
    (
        Agent::start(settings()).await.unwrap(),
        Agent::start(settings()).await.unwrap(),
    )
}

async fn transfer(route: Route, blocks: usize) -> Duration {
    let (a, b) = agents(route).await;
    let src = a.register(LAYOUT, blocks).unwrap();
    let dst = b.register(LAYOUT, blocks).unwrap();
    src.write(0, &vec![5u8; src.len()]).unwrap();
    let meta = b.metadata();
    let ops = || {
        (0..blocks)
            .map(|i| WriteOp {
                src: Source::Region(src.block(i)),
                dst: dst.block(i),
            })
            .collect::<Vec<_>>()
    };
    a.write(&meta, LAYOUT, ops()).await.unwrap(); // connect and map once
    let mut times = Vec::new();
    for _ in 0..reps(blocks) {
        let t = Instant::now();
        a.write(&meta, LAYOUT, ops()).await.unwrap();
        times.push(t.elapsed());
    }
    times.into_iter().min().unwrap()
}

async fn latency(route: Route) -> (Duration, Duration) {
    let (a, b) = agents(route).await;
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
        let m = memcpy(bytes);
        let s = transfer(Route::Shm, blocks).await;
        let raw = tokio::task::spawn_blocking(move || socket_blast(bytes))
            .await
            .unwrap();
        let t = transfer(Route::Tcp, blocks).await;
        for (name, d, rname, r) in [("shm", s, "memcpy", m), ("tcp", t, "one socket", raw)] {
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
