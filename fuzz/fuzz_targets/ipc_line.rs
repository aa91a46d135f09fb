//! Whatever a client writes to the socket: framing, then JSON-RPC parsing of every line.
#![no_main]

use cis2_core::ipc::framing::{Line, read_line};
use cis2_core::ipc::protocol::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(64, data);
        loop {
            match read_line(&mut reader).await {
                Ok(Line::Complete(line)) => {
                    let _ = parse(&line);
                }
                Ok(Line::TooLong) => {}
                Ok(Line::Eof) | Err(_) => break,
            }
        }
    });
});
