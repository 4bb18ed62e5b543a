//! A minimal HTTP/1.0 server side for the API sockets and the metrics
//! port: one request per connection (a GET, or a POST/DELETE with a JSON
//! body of a given length), which is all `darter`, curl and Prometheus
//! need.

use std::io::{self, BufRead, BufReader, Read, Write};

/// Largest request head accepted (hostile or broken clients).
const MAX_HEAD: u64 = 16 << 10;
/// Largest request body accepted (a mount request is a few hundred bytes).
const MAX_BODY: u64 = 64 << 10;

/// One request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request, or None if it is not well-formed HTTP (no method and
/// path, a body without or over its length).
pub(crate) fn read_request<R: Read>(stream: R) -> io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD + MAX_BODY));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut length = 0u64;
    let mut head = line.len() as u64;
    loop {
        line.clear();
        head += reader.read_line(&mut line)? as u64;
        if head > MAX_HEAD {
            return Ok(None);
        }
        if line.is_empty() || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            match value.trim().parse() {
                Ok(n) if n <= MAX_BODY => length = n,
                _ => return Ok(None),
            }
        }
    }
    let mut body = Vec::new();
    reader.take(length).read_to_end(&mut body)?;
    if body.len() as u64 != length {
        return Ok(None);
    }
    Ok(Some(Request { method, path, body }))
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

    /// A request's method, path and body.
    type Parsed<'a> = (&'a str, &'a str, &'a [u8]);

    #[test]
    fn parses_requests_with_and_without_bodies() {
        let cases: [(&[u8], Option<Parsed<'_>>); 6] = [
            (
                b"GET /stats HTTP/1.0\r\nHost: x\r\n\r\n",
                Some(("GET", "/stats", b"")),
            ),
            (
                b"GET /metrics HTTP/1.1\r\n\r\n",
                Some(("GET", "/metrics", b"")),
            ),
            (
                b"POST /mounts HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
                Some(("POST", "/mounts", b"{}")),
            ),
            // Shorter than announced.
            (
                b"POST /mounts HTTP/1.0\r\nContent-Length: 9\r\n\r\n{}",
                None,
            ),
            // Longer than allowed.
            (
                b"POST /mounts HTTP/1.0\r\nContent-Length: 999999999\r\n\r\n",
                None,
            ),
            (b"\r\n", None),
        ];
        for (req, want) in cases {
            let got = read_request(req).unwrap();
            let got = got
                .as_ref()
                .map(|r| (r.method.as_str(), r.path.as_str(), r.body.as_slice()));
            assert_eq!(got, want, "{}", String::from_utf8_lossy(req));
        }
    }
}
