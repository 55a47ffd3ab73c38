//! A guard in front of hyper that reads each request head exactly as the client sent it. hyper
//! resolves `Content-Length` together with `Transfer-Encoding` by dropping the length (RFC 9112
//! allows that), so the request never shows both; but a proxy in front or behind may frame it
//! the other way — the classic smuggling set-up — and the product refuses such requests with
//! 400. The guard follows message boundaries (lengths and chunks) and, when a head carries
//! both, breaks that head's final line ending so hyper answers 400 and closes the connection.
//! The same is done for a request target with a fragment (`#`), which hyper would drop.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heads beyond this are hyper's to refuse (431); the guard stops following.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// Lost or done: pass everything through (hyper still refuses what it cannot parse).
    Off,
}

/// Follows request framing over a byte stream.
#[derive(Debug)]
pub(crate) struct Scanner {
    state: State,
    buf: Vec<u8>,
}

/// What a complete head says.
fn analyze(head: &[u8]) -> (bool, State) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return (false, State::Off),
    }
    // A fragment is not part of a request target (RFC 9112 §3.2); hyper would drop it silently
    // and the decision would be made on less than the client sent.
    if req.path.is_some_and(|p| p.contains('#')) {
        return (true, State::Off);
    }
    let mut cl: Vec<&[u8]> = Vec::new();
    let mut te: Vec<&[u8]> = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(h.value);
        }
    }
    if !cl.is_empty() && !te.is_empty() {
        return (true, State::Off);
    }
    if let Some(last) = te.last() {
        let chunked = String::from_utf8_lossy(last)
            .rsplit(',')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        return (
            false,
            if chunked {
                State::ChunkSize
            } else {
                State::Off
            },
        );
    }
    match cl.as_slice() {
        [] => (false, State::Head),
        [one] => match std::str::from_utf8(one)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(0) => (false, State::Head),
            Some(n) => (false, State::Body(n)),
            None => (false, State::Off),
        },
        _ => (false, State::Off),
    }
}

/// Whether `prev` followed by `seg` (which ends in a line feed) ends a head: an empty line,
/// `\n\n` or `\n\r\n` (which covers `\r\n\r\n`): httparse accepts a bare `\n` ending a
/// field line followed by `\r\n`, so the guard must see that head end too.
fn ends_head(prev: &[u8], seg: &[u8]) -> bool {
    let mut tail = [0u8; 4];
    let mut n = 0;
    for &b in seg.iter().rev().chain(prev.iter().rev()).take(4) {
        n += 1;
        if let Some(t) = tail.get_mut(4 - n) {
            *t = b;
        }
    }
    let tail = tail.get(4 - n..).unwrap_or_default();
    tail.ends_with(b"\n\r\n") || tail.ends_with(b"\n\n")
}

impl Scanner {
    pub(crate) fn new() -> Scanner {
        Scanner {
            state: State::Head,
            buf: Vec::new(),
        }
    }

    /// Feeds bytes as read; returns the index (in `bytes`) of the byte to break when a head
    /// that just completed carries both Content-Length and Transfer-Encoding.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Off => return None,
                State::Head => {
                    let mut rest = bytes.get(i..)?;
                    if self.buf.is_empty() {
                        // Empty lines before a request line.
                        let skip = rest
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        i += skip;
                        rest = rest.get(skip..)?;
                        if rest.is_empty() {
                            return None;
                        }
                    }
                    // The head ends at the first line feed that closes an empty line.
                    let end = memchr::memchr_iter(b'\n', rest)
                        .take_while(|&p| self.buf.len() + p < MAX_HEAD)
                        .find(|&p| ends_head(&self.buf, rest.get(..=p).unwrap_or_default()));
                    let Some(p) = end else {
                        self.buf.extend_from_slice(rest);
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return None;
                    };
                    let head = rest.get(..=p).unwrap_or_default();
                    i += p + 1;
                    // Most heads arrive in one read: analyzed where they lie, not copied.
                    let (bad, next) = if self.buf.is_empty() {
                        analyze(head)
                    } else {
                        self.buf.extend_from_slice(head);
                        let r = analyze(&self.buf);
                        self.buf.clear();
                        r
                    };
                    self.state = next;
                    if bad {
                        return Some(i - 1);
                    }
                }
                State::Body(n) => {
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if n == take {
                        State::Head
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let &b = bytes.get(i)?;
                    i += 1;
                    self.buf.push(b);
                    if self.buf.len() > MAX_LINE {
                        self.state = State::Off;
                    } else if b == b'\n' {
                        let line = String::from_utf8_lossy(&self.buf).trim().to_owned();
                        self.buf.clear();
                        self.state = match self.state {
                            State::ChunkSize => {
                                let size = line
                                    .split(';')
                                    .next()
                                    .map(str::trim)
                                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                                match size {
                                    Some(0) => State::Trailers,
                                    Some(n) => State::ChunkData(n),
                                    None => State::Off,
                                }
                            }
                            _ if line.is_empty() => State::Head,
                            _ => State::Trailers,
                        };
                    }
                }
                State::ChunkData(n) => {
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if n == take {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd(k) => {
                    i += 1;
                    self.state = if k <= 1 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(k - 1)
                    };
                }
            }
        }
        None
    }
}

/// An I/O stream whose reads pass through a [`Scanner`].
#[derive(Debug)]
pub(crate) struct FramingGuard<T> {
    inner: T,
    scan: Scanner,
}

impl<T> FramingGuard<T> {
    pub(crate) fn new(inner: T) -> FramingGuard<T> {
        FramingGuard {
            inner,
            scan: Scanner::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let filled = buf.filled_mut();
        if let Some(new) = filled.get_mut(before..)
            && let Some(i) = this.scan.feed(new)
            && let Some(b) = new.get_mut(i)
        {
            // INVARIANT: `i` is the head's final line feed; a NUL there makes the head
            // unparsable, so hyper answers 400 and closes.
            *b = 0;
            metrics::counter!("castellan_proxy_smuggling_refused_total").increment(1);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(stream: &[u8], piece: usize) -> Vec<usize> {
        let mut s = Scanner::new();
        let mut out = Vec::new();
        for (n, chunk) in stream.chunks(piece).enumerate() {
            if let Some(i) = s.feed(chunk) {
                out.push(n * piece + i);
            }
        }
        out
    }

    #[test]
    fn flags_content_length_with_transfer_encoding_in_any_request_of_a_connection() {
        let ok1 = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let ok2 = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: t\r\n\r\n";
        let bad = b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let mut stream = Vec::new();
        stream.extend_from_slice(ok1);
        stream.extend_from_slice(ok2);
        let bad_at = stream.len() + bad.iter().position(|_| false).unwrap_or(0);
        stream.extend_from_slice(bad);
        let head_end = bad_at + bad.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        for piece in [1, 2, 7, 64, 4096] {
            assert_eq!(flags(&stream, piece), [head_end], "piece size {piece}");
        }
        // A body that looks like a bad head is body, not a head.
        let mut body_trick = b"POST /a HTTP/1.1\r\nContent-Length: 50\r\n\r\n".to_vec();
        body_trick.extend_from_slice(
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        body_trick.truncate(41 + 50);
        assert!(flags(&body_trick, 3).is_empty());
        assert!(
            flags(
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: y\r\n\r\n",
                5
            )
            .is_empty()
        );
        assert_eq!(
            flags(b"GET /a#/../b HTTP/1.1\r\nHost: x\r\n\r\n", 4).len(),
            1,
            "fragment"
        );
        // A head whose last field line ends in a bare LF before the empty line (httparse
        // accepts it): the guard must see that head end, or it loses the framing and lets the
        // next request carry both lengths.
        let lf = b"GET / HTTP/1.1\r\nHost: x\n\r\n";
        let mut stream = lf.to_vec();
        let bad_at = stream.len();
        stream.extend_from_slice(bad);
        let head_end = bad_at + bad.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        for piece in [1, 2, 7, 64, 4096] {
            assert_eq!(
                flags(&stream, piece),
                [head_end],
                "bare LF, piece size {piece}"
            );
        }
    }
}
