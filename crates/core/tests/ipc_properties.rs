//! Property tests for what a client can send: any bytes at all get a well-formed JSON-RPC answer from the
//! parser (never a panic), and framing returns exactly the lines that were sent, with over-long ones
//! reported and skipped. CI runs these; the fuzz target in fuzz/ explores the same code further.

use cis2_core::ipc::MAX_LINE_BYTES;
use cis2_core::ipc::framing::{Line, read_line};
use cis2_core::ipc::protocol::parse;
use proptest::prelude::*;

fn frame(input: &[u8], buffer: usize) -> Vec<Line> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(buffer, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader).await.unwrap() {
                Line::Eof => return out,
                line => out.push(line),
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_get_a_json_rpc_answer(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match parse(&bytes) {
            Ok(request) => {
                // Accepted only if it really is a JSON-RPC 2.0 request object with that method.
                let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                prop_assert_eq!(&value["jsonrpc"], "2.0");
                prop_assert_eq!(value["method"].as_str(), Some(request.method.as_str()));
            }
            Err(response) => {
                let response: serde_json::Value = serde_json::from_str(&response).unwrap();
                prop_assert_eq!(&response["jsonrpc"], "2.0");
                let code = response["error"]["code"].as_i64().unwrap();
                prop_assert!([-32700, -32600, -32602].contains(&code), "code {}", code);
                prop_assert!(response["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            }
        }
    }

    #[test]
    fn json_shaped_garbage_is_classified(
        id in prop_oneof![Just("1".to_string()), Just("\"a\"".to_string()), Just("null".to_string()), Just("{}".to_string()), Just("[1]".to_string()), Just("1e999".to_string())],
        method in prop_oneof![Just("\"token\"".to_string()), Just("7".to_string()), Just("null".to_string()), "\"[a-z_]{0,12}\""],
        params in prop_oneof![Just("{}".to_string()), Just("[]".to_string()), Just("null".to_string()), Just("{\"min_valid_secs\":18446744073709551616}".to_string()), Just("\"x\"".to_string())],
        version in prop_oneof![Just("\"2.0\"".to_string()), Just("\"1.0\"".to_string()), Just("2".to_string())],
    ) {
        let line = format!("{{\"jsonrpc\":{version},\"id\":{id},\"method\":{method},\"params\":{params}}}");
        match parse(line.as_bytes()) {
            Ok(request) => {
                prop_assert_eq!(version.as_str(), "\"2.0\"");
                prop_assert!(request.params.is_object());
            }
            Err(response) => {
                let response: serde_json::Value = serde_json::from_str(&response).unwrap();
                prop_assert!(response["error"]["code"].as_i64().is_some());
            }
        }
    }

    #[test]
    fn framing_returns_exactly_the_lines_sent(
        lines in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..300), 0..20),
        long_at in proptest::option::of(0usize..20),
        buffer in 1usize..4096,
    ) {
        let mut lines = lines;
        if let Some(at) = long_at.filter(|at| *at < lines.len()) {
            lines[at] = vec![b'x'; MAX_LINE_BYTES + 1];
        }
        let mut input = Vec::new();
        for line in &lines {
            input.extend_from_slice(line);
            input.push(b'\n');
        }
        let framed = frame(&input, buffer);
        prop_assert_eq!(framed.len(), lines.len());
        for (got, sent) in framed.iter().zip(&lines) {
            if sent.len() > MAX_LINE_BYTES {
                prop_assert_eq!(got, &Line::TooLong);
            } else {
                prop_assert_eq!(got, &Line::Complete(sent.clone()));
            }
        }
    }
}
