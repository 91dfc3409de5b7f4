//! Our block hashes equal an independent implementation's (Python `xxhash`, installed by
//! `scripts/install-python.sh`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use dynamo_kv::block_hashes;

#[test]
fn block_hashes_match_the_python_xxhash_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/install-python.sh"))
        .output()
        .expect("run scripts/install-python.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let mut x: u64 = 42;
    let mut sequences: Vec<Vec<u32>> = vec![
        vec![],
        vec![0, 1, 2],
        (0..64).collect(),
        vec![u32::MAX; 130],
    ];
    for len in [16usize, 17, 100, 333] {
        sequences.push(
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 150_000) as u32
                })
                .collect(),
        );
    }
    for block_size in [1usize, 16, 64] {
        let input = serde_json::json!({"block_size": block_size, "sequences": sequences});
        let mut child = Command::new(&py)
            .arg(root.join("scripts/kv-hash-vectors.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let reference: Vec<Vec<(u64, u64)>> = serde_json::from_slice(&out.stdout).unwrap();
        for (seq, want) in sequences.iter().zip(reference) {
            let got: Vec<(u64, u64)> = block_hashes(seq, block_size)
                .into_iter()
                .map(|(l, s)| (l.0, s.0))
                .collect();
            assert_eq!(got, want, "block size {block_size}, {} tokens", seq.len());
        }
    }
}
