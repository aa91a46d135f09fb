//! Framing: one `\n`-terminated line of at most [`MAX_LINE_BYTES`]. A longer line is skipped to its end
//! and reported, so the connection can go on.

use super::MAX_LINE_BYTES;
use std::io;
use tokio::io::AsyncBufReadExt;

/// What one read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one `\n`-terminated line of at most `MAX_LINE_BYTES`; a longer one is skipped to its end.
pub async fn read_line<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Line::Eof
            } else if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
        let (chunk_len, found_newline) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if !too_long {
            if line.len() + chunk_len > MAX_LINE_BYTES {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(&available[..chunk_len]);
            }
        }
        reader.consume(chunk_len + usize::from(found_newline));
        if found_newline {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    async fn lines(input: &[u8]) -> Vec<String> {
        let mut reader = BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader).await.unwrap() {
                Line::Complete(l) => out.push(String::from_utf8(l).unwrap()),
                Line::TooLong => out.push("<too long>".into()),
                Line::Eof => return out,
            }
        }
    }

    #[tokio::test]
    async fn framing_splits_lines_and_skips_overlong_ones() {
        let long = "x".repeat(MAX_LINE_BYTES + 1);
        let input = format!("one\ntwo\n{long}\nthree\nlast-without-newline");
        assert_eq!(
            lines(input.as_bytes()).await,
            vec!["one", "two", "<too long>", "three", "last-without-newline"]
        );
        let exact = "y".repeat(MAX_LINE_BYTES);
        assert_eq!(lines(format!("{exact}\n").as_bytes()).await, vec![exact]);
    }
}
