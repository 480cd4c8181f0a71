//! Mean latency of 4 KiB random reads at queue depth 1 through a vhost-user
//! socket, measured with libblkio: the measurement behind sluice's default
//! `--poll-us` (see README, "Performance").
//!
//! `cargo run --release -p sluice-tests --example qd1_latency -- SOCKET [READS]`

use std::time::Instant;

use sluice_tests::{Client, Op};

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("usage: qd1_latency SOCKET [READS]");
    let reads: usize = args
        .next()
        .map(|n| n.parse().expect("READS"))
        .unwrap_or(20_000);
    let mut client = Client::connect(socket.as_ref(), 1, 1).expect("connect");
    let capacity = client.get_u64("capacity").expect("capacity");
    let blocks = capacity / 4096;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let ops: Vec<Op> = (0..reads)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Op::Read {
                offset: (x % blocks) * 4096,
                len: 4096,
            }
        })
        .collect();
    // Warm up, then measure.
    client.run(0, &ops[..ops.len() / 10]).expect("warm-up");
    let start = Instant::now();
    let out = client.run(0, &ops).expect("reads");
    let elapsed = start.elapsed();
    assert!(out.iter().all(|o| o.ret == 0), "a read failed");
    println!(
        "{{\"reads\":{reads},\"mean_latency_us\":{:.2},\"iops\":{:.0}}}",
        elapsed.as_secs_f64() * 1e6 / reads as f64,
        reads as f64 / elapsed.as_secs_f64()
    );
}
