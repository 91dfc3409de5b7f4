//! The transfer library over each backend: bytes land where the descriptors say, and every
//! bad input (layouts, bounds, sizes, vanished peers, deadlines) is a typed error that moves
//! nothing.

use std::time::Duration;

use bytes::Bytes;
use dynamo_transfer::{
    Agent, AgentSettings, Backend, Descriptor, Dtype, Layout, Route, Source, TransferError, WriteOp,
};

const LAYOUT: Layout = Layout {
    layers: 2,
    kv_heads: 2,
    head_dim: 8,
    block_size: 4,
    dtype: Dtype::F32,
};

fn agent(route: Route) -> Agent {
    Agent::start(AgentSettings {
        name: "test".into(),
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        route,
        tcp_connections: 3,
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

async fn round_trip(route: Route, expect: Backend) {
    let (a, b) = (agent(route), agent(route));
    let bb = LAYOUT.block_bytes();
    let src = a.register(LAYOUT, 8).unwrap();
    let dst = b.register(LAYOUT, 8).unwrap();
    for i in 0..8 {
        src.write(i * bb, &pattern(i as u8, bb)).unwrap();
    }
    // Blocks 0..4 of `src` go to 4..8 of `dst` in reverse; one more from owned bytes.
    let mut ops: Vec<WriteOp> = (0..4)
        .map(|i| WriteOp {
            src: Source::Region(src.block(i)),
            dst: dst.block(7 - i),
        })
        .collect();
    ops.push(WriteOp {
        src: Source::Bytes(Bytes::from(pattern(99, bb))),
        dst: dst.block(0),
    });
    let report = a.write(&b.metadata(), LAYOUT, ops).await.unwrap();
    assert_eq!(report.backend, expect);
    assert_eq!(report.bytes, 5 * bb as u64);
    for i in 0..4 {
        assert_eq!(dst.read(&dst.block(7 - i)).unwrap(), pattern(i as u8, bb));
    }
    assert_eq!(dst.read(&dst.block(0)).unwrap(), pattern(99, bb));
    assert_eq!(dst.read(&dst.block(1)).unwrap(), vec![0u8; bb], "untouched");
    // And back: `a` reads dst's blocks 7 and 6 into its 6 and 7.
    let report = a
        .read(
            &b.metadata(),
            LAYOUT,
            vec![(dst.block(7), src.block(6)), (dst.block(6), src.block(7))],
        )
        .await
        .unwrap();
    assert_eq!(report.backend, expect);
    assert_eq!(src.read(&src.block(6)).unwrap(), pattern(0, bb));
    assert_eq!(src.read(&src.block(7)).unwrap(), pattern(1, bb));
}

#[tokio::test]
async fn bytes_land_where_descriptors_say_in_process() {
    round_trip(Route::Auto, Backend::Local).await;
}

#[tokio::test]
async fn bytes_land_where_descriptors_say_over_shared_memory() {
    round_trip(Route::Shm, Backend::Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_land_where_descriptors_say_over_tcp() {
    round_trip(Route::Tcp, Backend::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_is_cut_into_pieces_over_several_connections() {
    let big = Layout {
        layers: 4,
        kv_heads: 4,
        head_dim: 64,
        block_size: 1024,
        dtype: Dtype::F32,
    }; // 8 MiB blocks: two pieces each
    let (a, b) = (agent(Route::Tcp), agent(Route::Tcp));
    let src = a.register(big, 3).unwrap();
    let dst = b.register(big, 3).unwrap();
    let data = pattern(7, 3 * big.block_bytes());
    src.write(0, &data).unwrap();
    let whole = Descriptor {
        region: src.id(),
        offset: 0,
        len: data.len() as u64,
    };
    let to = Descriptor {
        region: dst.id(),
        ..whole
    };
    a.write(
        &b.metadata(),
        big,
        vec![WriteOp {
            src: Source::Region(whole),
            dst: to,
        }],
    )
    .await
    .unwrap();
    assert!(dst.read(&to).unwrap() == data);
}

async fn refused(route: Route) {
    let (a, b) = (agent(route), agent(route));
    let bb = LAYOUT.block_bytes();
    let dst = b.register(LAYOUT, 2).unwrap();
    let meta = b.metadata();
    let write = |dst: Descriptor, layout: Layout, len: usize| {
        let a = &a;
        let meta = meta.clone();
        async move {
            a.write(
                &meta,
                layout,
                vec![WriteOp {
                    src: Source::Bytes(Bytes::from(vec![1u8; len])),
                    dst,
                }],
            )
            .await
        }
    };
    let other = Layout {
        head_dim: 16,
        ..LAYOUT
    };
    assert!(matches!(
        write(dst.block(0), other, bb).await,
        Err(TransferError::LayoutMismatch { .. })
    ));
    assert!(matches!(
        write(dst.block(2), LAYOUT, bb).await,
        Err(TransferError::OutOfBounds { .. })
    ));
    assert!(matches!(
        write(dst.block(0), LAYOUT, bb - 1).await,
        Err(TransferError::LengthMismatch { .. })
    ));
    // The peer's metadata claims a bigger region than it has (stale or forged): the
    // receiving side's own bounds stop it (shared memory checks the memfd's size).
    let mut forged = meta.clone();
    forged.regions[0].len *= 4;
    let far = Descriptor {
        region: dst.id(),
        offset: 3 * bb as u64,
        len: bb as u64,
    };
    let r = a
        .write(
            &forged,
            LAYOUT,
            vec![WriteOp {
                src: Source::Bytes(Bytes::from(vec![1u8; bb])),
                dst: far,
            }],
        )
        .await;
    assert!(
        matches!(
            r,
            Err(TransferError::OutOfBounds { .. } | TransferError::RegionSize { .. })
        ),
        "{r:?}"
    );
    // Nothing landed.
    assert_eq!(dst.read(&dst.block(0)).unwrap(), vec![0u8; bb]);
    assert_eq!(dst.read(&dst.block(1)).unwrap(), vec![0u8; bb]);
    // A deregistered region, then a vanished agent.
    let gone = dst.id();
    assert!(b.deregister(gone));
    if route != Route::Shm {
        assert_eq!(
            write(dst.block(0), LAYOUT, bb).await,
            Err(TransferError::UnknownRegion(gone))
        );
    }
    drop(dst);
    drop(b);
    let r = write(
        Descriptor {
            region: gone,
            offset: 0,
            len: bb as u64,
        },
        LAYOUT,
        bb,
    )
    .await;
    assert!(r.is_err(), "a write to a dropped agent fails");
}

#[tokio::test]
async fn bad_transfers_are_typed_errors_in_process() {
    refused(Route::Auto).await;
}

#[tokio::test]
async fn bad_transfers_are_typed_errors_over_shared_memory() {
    refused(Route::Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transfers_are_typed_errors_over_tcp() {
    refused(Route::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_agent_is_peer_gone_and_a_silent_one_times_out() {
    let a = Agent::start(AgentSettings {
        route: Route::Tcp,
        timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .unwrap();
    let b = agent(Route::Tcp);
    let dst = b.register(LAYOUT, 1).unwrap();
    let mut meta = b.metadata();
    let op = || {
        vec![WriteOp {
            src: Source::Bytes(Bytes::from(vec![0u8; LAYOUT.block_bytes()])),
            dst: dst.block(0),
        }]
    };
    a.write(&meta, LAYOUT, op()).await.unwrap();
    drop(b);
    let r = a.write(&meta, LAYOUT, op()).await;
    assert!(
        matches!(r, Err(TransferError::PeerGone(_))),
        "a stopped listener: {r:?}"
    );
    // A listener that accepts and never answers: the deadline ends the transfer.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    meta.tcp = Some(silent.local_addr().unwrap());
    meta.agent = dynamo_transfer::AgentId(meta.agent.0 ^ 1);
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let r = a.write(&meta, LAYOUT, op()).await;
    assert_eq!(r, Err(TransferError::Timeout(Duration::from_millis(300))));
    hold.abort();
    // In process: a dropped agent is gone at once.
    let (c, d) = (agent(Route::Auto), agent(Route::Auto));
    let r2 = d.register(LAYOUT, 1).unwrap();
    let meta = d.metadata();
    drop(d);
    let r = c
        .write(
            &meta,
            LAYOUT,
            vec![WriteOp {
                src: Source::Bytes(Bytes::from(vec![0u8; LAYOUT.block_bytes()])),
                dst: r2.block(0),
            }],
        )
        .await;
    assert!(matches!(r, Err(TransferError::PeerGone(_))), "{r:?}");
}
