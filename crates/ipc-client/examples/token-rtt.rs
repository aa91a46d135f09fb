//! The token round trip over the agent's socket (Unix) or named pipe (Windows), for the figures in
//! docs/deployment.md: CLIENTS connections in threads of their own, each asking `token` CALLS times one
//! after another, against an agent that is already signed in. Prints the latency percentiles of every
//! call. scripts/bench-token-rtt starts the agent, signs in and runs the fixed workloads.
//! Usage: token-rtt SOCKET [CLIENTS (1)] [CALLS per client (2000)]

use cis2_ipc_client::Client;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn number(arg: Option<String>, default: usize, what: &str) -> usize {
    match arg {
        None => default,
        Some(text) => text.parse().unwrap_or_else(|_| {
            eprintln!("token-rtt: {what} must be a whole number (got {text:?})");
            std::process::exit(2);
        }),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next().map(PathBuf::from) else {
        eprintln!("usage: token-rtt SOCKET [CLIENTS] [CALLS]");
        std::process::exit(2);
    };
    let clients = number(args.next(), 1, "CLIENTS");
    let calls = number(args.next(), 2000, "CALLS");
    if clients == 0 || calls == 0 {
        eprintln!("token-rtt: CLIENTS and CALLS must be at least 1");
        std::process::exit(2);
    }
    // Every client connects and has its first answer before any is timed: connecting is not the
    // round trip measured here.
    let start = Arc::new(Barrier::new(clients + 1));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.clone();
            let start = start.clone();
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let ready = Client::connect(&socket)
                    .and_then(|mut client| client.call("token", json!({})).map(|_| client));
                // Everyone reaches the barrier, a failed client too, or the others would wait forever.
                start.wait();
                let mut client = ready.map_err(|e| e.to_string())?;
                let mut times = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let sent = Instant::now();
                    client.call("token", json!({})).map_err(|e| e.to_string())?;
                    times.push(sent.elapsed());
                }
                Ok(times)
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut all = Vec::with_capacity(clients * calls);
    for worker in workers {
        match worker.join() {
            Ok(Ok(times)) => all.extend(times),
            Ok(Err(e)) => {
                eprintln!("token-rtt: a client failed: {e}");
                std::process::exit(1);
            }
            Err(_) => {
                eprintln!("token-rtt: a client thread panicked");
                std::process::exit(1);
            }
        }
    }
    let wall = began.elapsed();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "clients={clients} calls={} p50={:.0}us p99={:.0}us max={:.0}us throughput={:.0}/s",
        all.len(),
        us(at(0.50)),
        us(at(0.99)),
        us(all[all.len() - 1]),
        all.len() as f64 / wall.as_secs_f64()
    );
}
