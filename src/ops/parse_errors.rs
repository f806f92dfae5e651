//! Request heads the HTTP server cannot read, answered with a FHIR `OperationOutcome`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{MakeUuid, X_REQUEST_ID};
use crate::outcome::{IssueType, OperationOutcome};

/// A server connection's I/O (a `TcpStream`, or the decrypted side of a TLS stream) on which
/// hyper's HTTP/1 server's own answer to a first request head it cannot parse goes out as a
/// FHIR `OperationOutcome`.
///
/// hyper answers such a head itself, before any layer sees a request: `400 Bad Request` (a
/// method, target, version or header field it cannot read), `431 Request Header Fields Too
/// Large` (a head past its read buffer, or with more fields than it takes) or `414 URI Too
/// Long`, each with an empty body, and then closes the connection. It offers no hook for that
/// answer, so this wrapper recognises it as hyper writes it and writes in its place the same
/// status line with an `OperationOutcome` body (`structure`, or `too-long`), a new
/// `X-Request-Id` (no request was ever made of the head), `Connection: close`, `Cache-Control:
/// no-store` and hyper's own `Date`. Each such answer is logged at `info` with its request id,
/// its status and the peer (when given with [`peer`](Self::peer)).
///
/// Only the connection's first write is looked at: the first bytes an HTTP/1 connection
/// writes begin a response head (an HTTP/2 connection's are its preface, never taken for one),
/// while later writes may be any part of a response body, which an upstream could fill with
/// whatever looks like a head. It is recognised when that write is exactly hyper's answer: a
/// `400`, `414` or `431` head whose only fields are `connection`, `content-length: 0` and
/// `date`, and nothing after it. Every other byte passes through untouched; a write costs one
/// branch once the first is past. A head that cannot be parsed later on a keep-alive connection
/// gets hyper's empty answer: telling it from a body there would take the responses' framing.
/// A service's own answer to a connection's first request is taken for hyper's only if it has
/// that very shape: an empty `400`, `414` or `431` with no field of its own, which the
/// [`RequestIdLayer`](super::RequestIdLayer) in front rules out (every answer then carries an
/// `X-Request-Id`).
///
/// Wrap each accepted connection before hyper serves it (with axum, in a `Listener` of your
/// own whose `accept` wraps what the `TcpListener`'s returns):
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use hyper_util::rt::TokioIo;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tower_fhir::ops::ParseErrorOutcomes;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let (mut client, server) = tokio::io::duplex(4096);
/// let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
///     Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// });
/// tokio::spawn(
///     hyper::server::conn::http1::Builder::new()
///         .serve_connection(TokioIo::new(ParseErrorOutcomes::new(server)), service),
/// );
///
/// client.write_all(b"GET /Patient/1 HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n").await.unwrap();
/// let mut answer = String::new();
/// client.read_to_string(&mut answer).await.unwrap();
/// assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"));
/// assert!(answer.contains("\r\ncontent-type: application/fhir+json\r\n"));
/// assert!(answer.contains("\r\nx-request-id: "));
/// assert!(answer.ends_with(r#""code":"structure","diagnostics":"The request head is not valid HTTP/1.1 (RFC 9112): its method, target, version or a header field could not be read. The connection is closed."}]}"#));
/// # });
/// ```
#[derive(Debug)]
pub struct ParseErrorOutcomes<T> {
    io: T,
    state: State,
    /// The client, for the log line.
    peer: Option<std::net::SocketAddr>,
}

/// Where a [`ParseErrorOutcomes`] is in its connection's writes.
#[derive(Debug)]
enum State {
    /// Nothing written yet.
    First,
    /// hyper's answer being written in its FHIR form.
    Refusing(Box<HeadRefusal>),
    /// Past the first write: everything passes through.
    Passing,
}

impl<T> ParseErrorOutcomes<T> {
    /// Wraps a connection's I/O.
    pub fn new(io: T) -> Self {
        Self {
            io,
            state: State::First,
            peer: None,
        }
    }

    /// Names the connection's client in the log line of a refusal.
    #[must_use]
    pub fn peer(mut self, peer: std::net::SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The wrapped I/O, to change.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// The wrapped I/O, the wrapper gone.
    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: AsyncWrite + Unpin> ParseErrorOutcomes<T> {
    /// When the connection's first write (`first`: its first non-empty slice, `total` bytes
    /// in all) is hyper's own answer to a request head it could not parse, the FHIR answer
    /// written in its place: ready once all of it is.
    fn refusing(
        &mut self,
        cx: &mut Context<'_>,
        first: &[u8],
        total: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        match self.state {
            State::Passing => return None,
            State::First if total == 0 => return None,
            State::First => match HeadRefusal::recognise(first) {
                Some(refusal) if refusal.replaces == total => {
                    tracing::info!(
                        peer = self.peer.map(tracing::field::display),
                        request_id = refusal.request_id.to_str().ok(),
                        status = refusal.status.as_u16(),
                        "a request head the HTTP server could not parse answered with an OperationOutcome"
                    );
                    self.state = State::Refusing(Box::new(refusal));
                }
                _ => {
                    self.state = State::Passing;
                    return None;
                }
            },
            State::Refusing(_) => {}
        }
        let poll = self.poll_refusal(cx)?;
        Some(poll)
    }

    /// Writes more of the answer being written, if one is.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<usize>>> {
        let State::Refusing(refusal) = &mut self.state else {
            return None;
        };
        let io = &mut self.io;
        let poll = refusal.poll_write_with(|bytes| Pin::new(&mut *io).poll_write(cx, bytes));
        if poll.is_ready() {
            self.state = State::Passing;
        }
        Some(poll)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParseErrorOutcomes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParseErrorOutcomes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(poll) = self.refusing(cx, buf, buf.len()) {
            return poll;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !matches!(self.state, State::Passing) {
            let first = bufs.iter().find(|buf| !buf.is_empty());
            let total = bufs.iter().map(|buf| buf.len()).sum();
            if let Some(poll) = self.refusing(cx, first.map_or(&[], |buf| &**buf), total) {
                return poll;
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // An answer half written is finished first (or given up on an error).
        if let Some(Poll::Pending) = self.poll_refusal(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How far into a write hyper's answer head is looked for (it is about 100 bytes).
const LONGEST_HEAD: usize = 512;

/// The answer written in place of hyper's own to a request head it could not parse.
#[derive(Debug)]
struct HeadRefusal {
    /// The whole answer: head and body.
    answer: Vec<u8>,
    /// How much of it is written.
    sent: usize,
    /// The length of hyper's head, reported written once the answer is.
    replaces: usize,
    /// The answer's status and `X-Request-Id`, for the log.
    status: StatusCode,
    request_id: HeaderValue,
}

impl HeadRefusal {
    /// The answer to write instead, when `written` (what hyper is writing) begins with its own
    /// answer to a request head it could not parse.
    fn recognise(written: &[u8]) -> Option<Self> {
        // Every write of a connection passes here: one comparison for all but 4xx heads.
        if !written.starts_with(b"HTTP/1.1 4") {
            return None;
        }
        let looked_at = &written[..written.len().min(LONGEST_HEAD)];
        let fields_end = looked_at.windows(4).position(|four| four == b"\r\n\r\n")?;
        // Each line with its `\r`: the last one's `\n` left out.
        let mut lines = looked_at[..=fields_end].split(|&byte| byte == b'\n');
        let status_line = lines.next()?.strip_suffix(b"\r")?;
        let (status, code, diagnostics) = match status_line.get(9..12)? {
            b"400" => (
                StatusCode::BAD_REQUEST,
                IssueType::Structure,
                "The request head is not valid HTTP/1.1 (RFC 9112): its method, target, \
                 version or a header field could not be read. The connection is closed.",
            ),
            b"414" => (
                StatusCode::URI_TOO_LONG,
                IssueType::TooLong,
                "The request target is too long. The connection is closed.",
            ),
            b"431" => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                IssueType::TooLong,
                "The request's header section is larger than this server reads (too many \
                 bytes or fields). The connection is closed.",
            ),
            _ => return None,
        };
        let (mut date, mut empty) = (None, false);
        for line in lines {
            let line = line.strip_suffix(b"\r")?;
            let colon = line.iter().position(|&byte| byte == b':')?;
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            match name {
                b"connection" => {}
                b"content-length" if value == b"0" => empty = true,
                b"date" => date = Some(value),
                _ => return None,
            }
        }
        // hyper says its answer is empty.
        if !empty {
            return None;
        }
        let request_id = MakeUuid.new_id();
        let response = OperationOutcome::error(code, diagnostics).to_response(status);
        let body = response.body();
        let mut answer = Vec::with_capacity(LONGEST_HEAD + body.len());
        answer.extend_from_slice(status_line);
        answer.extend_from_slice(b"\r\n");
        let mut field = |name: &[u8], value: &[u8]| {
            answer.extend_from_slice(name);
            answer.extend_from_slice(b": ");
            answer.extend_from_slice(value);
            answer.extend_from_slice(b"\r\n");
        };
        for (name, value) in response.headers() {
            field(name.as_str().as_bytes(), value.as_bytes());
        }
        field(b"content-length", body.len().to_string().as_bytes());
        field(X_REQUEST_ID.as_str().as_bytes(), request_id.as_bytes());
        field(b"connection", b"close");
        if let Some(date) = date {
            field(b"date", date);
        }
        answer.extend_from_slice(b"\r\n");
        answer.extend_from_slice(body);
        Some(Self {
            answer,
            sent: 0,
            replaces: fields_end + 4,
            status,
            request_id,
        })
    }

    /// Writes the rest of the answer with `write` (a socket's `poll_write`): ready with the
    /// length of hyper's head once all of it is written, so hyper takes its head as sent.
    fn poll_write_with(
        &mut self,
        mut write: impl FnMut(&[u8]) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        while self.sent < self.answer.len() {
            match ready!(write(&self.answer[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(written) => self.sent += written,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        Poll::Ready(Ok(self.replaces))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper 1's answer to a head it cannot parse, as it writes it.
    fn hypers(status_line: &str) -> Vec<u8> {
        format!(
            "{status_line}\r\nconnection: close\r\ncontent-length: 0\r\n\
             date: Sat, 05 Dec 2026 10:17:34 GMT\r\n\r\n"
        )
        .into_bytes()
    }

    /// The answer written whole at once.
    fn written(refusal: &mut HeadRefusal) -> (usize, Vec<u8>) {
        let mut out = Vec::new();
        let replaced = refusal.poll_write_with(|bytes| {
            out.extend_from_slice(bytes);
            Poll::Ready(Ok(bytes.len()))
        });
        match replaced {
            Poll::Ready(Ok(replaced)) => (replaced, out),
            other => panic!("{other:?}"),
        }
    }

    /// A head's fields (names lowercased) and its body.
    fn parsed(answer: &[u8]) -> (String, Vec<(String, String)>, serde_json::Value) {
        let text = std::str::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let fields = lines
            .map(|line| {
                let (name, value) = line.split_once(": ").unwrap();
                (name.to_ascii_lowercase(), value.to_owned())
            })
            .collect();
        (status_line, fields, serde_json::from_str(body).unwrap())
    }

    fn field<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        fields
            .iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    #[test]
    fn hypers_answers_get_the_same_status_an_outcome_an_id_and_its_date() {
        for (status_line, code) in [
            ("HTTP/1.1 400 Bad Request", "structure"),
            ("HTTP/1.1 414 URI Too Long", "too-long"),
            ("HTTP/1.1 431 Request Header Fields Too Large", "too-long"),
        ] {
            let hypers = hypers(status_line);
            let mut refusal = HeadRefusal::recognise(&hypers).expect(status_line);
            let (replaced, answer) = written(&mut refusal);
            assert_eq!(replaced, hypers.len());
            let (line, fields, body) = parsed(&answer);
            assert_eq!(line, status_line);
            assert_eq!(field(&fields, "content-type"), ["application/fhir+json"]);
            assert_eq!(field(&fields, "connection"), ["close"]);
            assert_eq!(
                field(&fields, "date"),
                ["Sat, 05 Dec 2026 10:17:34 GMT"],
                "hyper's date kept"
            );
            let id = field(&fields, "x-request-id");
            assert_eq!(id, [refusal.request_id.to_str().unwrap()]);
            assert_eq!(id[0].len(), 36, "a UUID");
            assert_eq!(body["resourceType"], "OperationOutcome");
            assert_eq!(body["issue"][0]["code"], code);
            assert_eq!(body["issue"][0]["severity"], "error");
        }
    }

    #[test]
    fn the_content_length_is_the_bodys() {
        let hypers = hypers("HTTP/1.1 400 Bad Request");
        let (_, answer) = written(&mut HeadRefusal::recognise(&hypers).unwrap());
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length = head
            .split("\r\n")
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), body.len());
    }

    #[test]
    fn only_hypers_exact_answer_is_recognised() {
        for other in [
            // The gateway's own refusals: a body, a type, a request id.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/fhir+json\r\n\
               content-length: 120\r\nx-request-id: abc\r\n\r\n{"[..],
            // An upstream's empty 400 as relayed: with the request's id.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-request-id: abc\r\n\r\n",
            // Another status, the same shape.
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            // A length other than none.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nhello",
            // A head not whole in the write, or not at its start.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"a\":1}HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            // A field line that is not one.
            b"HTTP/1.1 400 Bad Request\r\nno colon\r\n\r\n",
            // No length: not hyper's.
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n",
            b"",
        ] {
            assert!(
                HeadRefusal::recognise(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn an_answer_written_a_few_bytes_at_a_time_reports_hypers_head_once_whole() {
        let hypers = hypers("HTTP/1.1 431 Request Header Fields Too Large");
        let mut refusal = HeadRefusal::recognise(&hypers).unwrap();
        let mut out = Vec::new();
        let mut turn = 0;
        let replaced = loop {
            turn += 1;
            // A socket that takes 7 bytes, then has no room, in turn.
            let mut room = true;
            let poll = refusal.poll_write_with(|bytes| {
                if !std::mem::take(&mut room) {
                    return Poll::Pending;
                }
                let taken = bytes.len().min(7);
                out.extend_from_slice(&bytes[..taken]);
                Poll::Ready(Ok(taken))
            });
            match poll {
                Poll::Pending => assert!(turn < 10_000),
                Poll::Ready(Ok(replaced)) => break replaced,
                Poll::Ready(Err(error)) => panic!("{error}"),
            }
        };
        assert_eq!(replaced, hypers.len());
        let (line, _, body) = parsed(&out);
        assert_eq!(line, "HTTP/1.1 431 Request Header Fields Too Large");
        assert_eq!(body["issue"][0]["code"], "too-long");
    }

    #[test]
    fn a_socket_that_takes_nothing_or_fails_is_an_error() {
        let hypers = hypers("HTTP/1.1 400 Bad Request");
        let mut refusal = HeadRefusal::recognise(&hypers).unwrap();
        match refusal.poll_write_with(|_| Poll::Ready(Ok(0))) {
            Poll::Ready(Err(error)) => assert_eq!(error.kind(), io::ErrorKind::WriteZero),
            other => panic!("{other:?}"),
        }
        let mut refusal = HeadRefusal::recognise(&hypers).unwrap();
        match refusal.poll_write_with(|_| Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))) {
            Poll::Ready(Err(error)) => assert_eq!(error.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("{other:?}"),
        }
    }

    /// What `writes` come out as through a fresh wrapper, each written whole in turn.
    async fn through(writes: &[&[u8]]) -> Vec<u8> {
        use tokio::io::AsyncWriteExt;
        let mut io = ParseErrorOutcomes::new(Vec::new());
        for write in writes {
            io.write_all(write).await.unwrap();
        }
        io.shutdown().await.unwrap();
        io.into_inner()
    }

    #[tokio::test]
    async fn only_the_connections_first_write_can_be_hypers_answer() {
        let hypers = hypers("HTTP/1.1 400 Bad Request");
        let replaced = through(&[&hypers]).await;
        assert!(
            replaced.ends_with(b"}]}"),
            "{}",
            String::from_utf8_lossy(&replaced)
        );
        // A response head first, then a body whose chunk looks like hyper's answer (an
        // upstream's stored Binary, say): passed on byte for byte.
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 300\r\n\r\n";
        let writes: [&[u8]; 3] = [head, &hypers, b"HTTP/1.1 400 X\r\n\r\n"];
        assert_eq!(through(&writes).await, writes.concat());
        // hyper's head with more after it in the same write is no answer of hyper's.
        let more = [&hypers[..], b"tail"].concat();
        assert_eq!(through(&[&more]).await, more);
        // An HTTP/2 connection's first write is its preface's SETTINGS frame.
        let settings: [&[u8]; 2] = [b"\0\0\0\x04\0\0\0\0\0", &hypers];
        assert_eq!(through(&settings).await, settings.concat());
    }

    /// A socket that takes 7 bytes, then has no room until it is polled again.
    struct Trickle {
        taken: Vec<u8>,
        room: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if !std::mem::replace(&mut self.room, false) {
                self.room = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let taken = buf.len().min(7);
            self.taken.extend_from_slice(&buf[..taken]);
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_answer_cut_by_a_shutdown_is_finished_first() {
        use tokio::io::AsyncWriteExt;
        let hypers = hypers("HTTP/1.1 400 Bad Request");
        let mut io = ParseErrorOutcomes::new(Trickle {
            taken: Vec::new(),
            room: true,
        });
        // One poll of the write: 7 bytes of the answer taken, then no room.
        {
            let mut write = std::pin::pin!(io.write(&hypers));
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(std::future::Future::poll(write.as_mut(), cx))
            })
            .await;
            assert!(polled.is_pending());
        }
        io.shutdown().await.unwrap();
        let (_, answer) = written(&mut HeadRefusal::recognise(&hypers).unwrap());
        let taken = io.into_inner().taken;
        // The same answer but for its request id.
        assert_eq!(taken.len(), answer.len());
        assert!(taken.ends_with(b"}]}"));
    }
}
