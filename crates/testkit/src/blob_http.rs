//! Plain HTTP/1.1 blob transfers for tests and benchmarks, on a fresh
//! connection each: a GET (through a P2P peer's registry mirror or straight
//! from a registry) that hashes the body as it streams and tells a broken
//! transfer from a complete one, and a monolithic blob upload to a
//! registry. Nothing is buffered whole, so 1 GiB blobs stream through.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

/// How long one read or write may stall.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// What one GET returned.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The status code; 0 if the connection broke before a status line.
    pub status: u16,
    /// The response head, lowercased.
    pub head: String,
    /// Body bytes received.
    pub length: u64,
    /// `sha256:<hex>` of the body received.
    pub digest: String,
    /// The connection broke, or the body was shorter than its
    /// Content-Length: the bytes received are not the whole answer.
    pub broken: bool,
}

impl Fetched {
    /// Whether this is a complete 200 answer whose body is `size` bytes
    /// with digest `digest`.
    pub fn is_blob(&self, digest: &str, size: u64) -> bool {
        self.status == 200 && !self.broken && self.length == size && self.digest == digest
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `GET path` from `addr` with extra `headers` (`Name: value`), hashing
/// the body as it arrives. A connection that cannot be made is an error; a
/// transfer that breaks later is a [`Fetched`] marked `broken`.
pub fn get(addr: SocketAddr, path: &str, headers: &[String]) -> anyhow::Result<Fetched> {
    let stream = connect(addr)?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    (&stream)
        .write_all(request.as_bytes())
        .with_context(|| format!("sending GET {path} to {addr}"))?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let Some(head) = read_head(&mut reader) else {
        return Ok(Fetched {
            status: 0,
            head: String::new(),
            length: 0,
            digest: String::new(),
            broken: true,
        });
    };
    let status = status_of(&head).with_context(|| format!("GET {path} from {addr}: {head:?}"))?;
    let announced = header_value(&head, "content-length").and_then(|v| v.parse::<u64>().ok());
    let head = head.to_lowercase();
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let mut broken = false;
    loop {
        match reader.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => {
                hasher.update(chunk);
                let n = chunk.len();
                length += n as u64;
                reader.consume(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    Ok(Fetched {
        status,
        head,
        length,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        broken: broken || announced.is_some_and(|n| n != length),
    })
}

/// Uploads `data` to `repository` of the registry at `addr` in one PUT;
/// returns its digest.
pub fn push_blob(addr: SocketAddr, repository: &str, data: &[u8]) -> anyhow::Result<String> {
    let digest = sha256_digest(data);
    let start = format!("/v2/{repository}/blobs/uploads/");
    let head = exchange(addr, "POST", &start, &[], b"")?;
    if status_of(&head)? != 202 {
        bail!("POST {start} to {addr}: {head:?}");
    }
    let location = header_value(&head, "location")
        .with_context(|| format!("POST {start} to {addr}: no Location in {head:?}"))?;
    // The registry answers with an absolute URL; the path is what counts.
    let path = match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    };
    let separator = if path.contains('?') { '&' } else { '?' };
    let put = format!("{path}{separator}digest={digest}");
    let head = exchange(
        addr,
        "PUT",
        &put,
        &["Content-Type: application/octet-stream"],
        data,
    )?;
    if status_of(&head)? != 201 {
        bail!("PUT of {digest} to {addr}: {head:?}");
    }
    Ok(digest)
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends one request with `body` and returns the response head (the body
/// is read and dropped).
fn exchange(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[&str],
    body: &[u8],
) -> anyhow::Result<String> {
    let mut stream = connect(addr)?;
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.write_all(body))
        .with_context(|| format!("sending {method} {target} to {addr}"))?;
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)
        .with_context(|| format!("{method} {target} to {addr}: no answer"))?;
    let _ = std::io::copy(&mut reader.take(1 << 20), &mut std::io::sink());
    Ok(head)
}

/// The response head up to the empty line; `None` if the connection ends
/// first.
fn read_head(reader: &mut impl std::io::BufRead) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line == "\r\n" || line == "\n" => return Some(head),
            Ok(_) => head.push_str(&line),
        }
    }
}

fn status_of(head: &str) -> anyhow::Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))
}

/// The value of header `name` (any case) in a response head.
fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TestRegistry;

    #[test]
    fn heads_give_their_status_and_headers() {
        let head = "HTTP/1.1 206 Partial Content\r\nContent-Length: 12\r\nLocation: /v2/x?a=B\r\n";
        assert_eq!(status_of(head).unwrap(), 206);
        assert_eq!(header_value(head, "content-length"), Some("12"));
        assert_eq!(header_value(head, "location"), Some("/v2/x?a=B"));
        assert_eq!(header_value(head, "range"), None);
        assert!(status_of("garbage").is_err());
    }

    /// Against a real registry: a pushed blob comes back whole with its
    /// digest, a range is a 206 of the right bytes, an unknown blob a 404.
    #[test]
    fn a_pushed_blob_is_fetched_back_whole_and_in_ranges() {
        let registry = TestRegistry::start();
        let data: Vec<u8> = (0..3_000_001u32)
            .map(|i| (i.wrapping_mul(7919) >> 5) as u8)
            .collect();
        let digest = push_blob(registry.addr(), "test/blob", &data).unwrap();
        assert_eq!(digest, sha256_digest(&data));
        let path = format!("/v2/test/blob/blobs/{digest}");
        let whole = get(registry.addr(), &path, &[]).unwrap();
        assert!(whole.is_blob(&digest, data.len() as u64), "{whole:?}");
        let ranged = get(registry.addr(), &path, &["Range: bytes=10-19".into()]).unwrap();
        assert_eq!(ranged.status, 206);
        assert_eq!(ranged.digest, sha256_digest(&data[10..20]));
        let missing = format!("/v2/test/blob/blobs/{}", sha256_digest(b"nope"));
        assert_eq!(get(registry.addr(), &missing, &[]).unwrap().status, 404);
    }
}
