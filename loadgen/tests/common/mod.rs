//! A small HTTP/1.1 server on loopback for the load generator's tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

/// A keep-alive server answering each request (its head, and a body of its `Content-Length`)
/// with what `answer` makes of the head, in lower case; its address.
pub(crate) fn keep_alive_server(
    answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
) -> SocketAddr {
    keep_alive_server_with_bodies(move |head, _| answer(head))
}

/// [`keep_alive_server`], `answer` given each request's body as well as its head.
#[allow(dead_code)] // not every test binary takes bodies
pub(crate) fn keep_alive_server_with_bodies(
    answer: impl Fn(&str, &[u8]) -> Vec<u8> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let answer = Arc::clone(&answer);
            std::thread::spawn(move || {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(read) = stream.read(&mut chunk) else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length:"))
                            .and_then(|value| value.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buffer.len() < end + 4 + length {
                            break;
                        }
                        let body: Vec<u8> =
                            buffer.drain(..end + 4 + length).skip(end + 4).collect();
                        if stream.write_all(&answer(&head, &body)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}
