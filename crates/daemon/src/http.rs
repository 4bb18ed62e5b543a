//! A minimal HTTP/1.0 responder for the API socket and the metrics port:
//! one GET per connection, which is all `darter stats`, curl and
//! Prometheus need.

use std::io::{self, BufRead, BufReader, Read, Write};

/// Largest request head accepted (hostile or broken clients).
const MAX_HEAD: u64 = 16 << 10;

/// Reads one request head and returns the request path, or None if the
/// request is not a well-formed GET.
pub(crate) fn read_get<R: Read>(stream: R) -> io::Result<Option<String>> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some("GET"), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let path = path.to_owned();
    // Drain the headers up to the blank line.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok(Some(path))
}

/// Writes a complete response.
pub(crate) fn respond<W: Write>(
    mut out: W,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    write!(
        out,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gets_only() {
        let cases: [(&[u8], Option<&str>); 4] = [
            (b"GET /stats HTTP/1.0\r\nHost: x\r\n\r\n", Some("/stats")),
            (b"GET /metrics HTTP/1.1\r\n\r\n", Some("/metrics")),
            (b"POST /stats HTTP/1.0\r\n\r\n", None),
            (b"\r\n", None),
        ];
        for (req, want) in cases {
            assert_eq!(read_get(req).unwrap().as_deref(), want);
        }
    }
}
