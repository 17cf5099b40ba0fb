//! Line framing of the inbound byte stream, with hard memory bounds.
//!
//! The reader never holds more than one bounded line: a command line longer than
//! its limit is discarded as it arrives (not buffered) and reported once its end
//! is seen; message data is handed over line by line and the caller stops
//! storing it once the size limit is passed. Every socket read is bounded by the
//! idle timeout.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from the socket at a time.
const CHUNK: usize = 16 * 1024;

/// Why no line could be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("connection closed by client")]
    Closed,
    #[error("no data from client within {0:?}")]
    Idle(Duration),
    #[error("session lasted longer than allowed")]
    Deadline,
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}

/// One framed line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line with its terminator (`\n` or `\r\n`).
    Complete(Vec<u8>),
    /// The line exceeded the limit; its bytes were discarded through its end.
    /// `crlf` says whether it ended with CR LF (DATA framing needs to know).
    TooLong { crlf: bool },
}

/// Buffered reader over the client side of a session.
pub struct Input<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
    idle: Duration,
    /// No read waits past this instant (the session's total time limit).
    deadline: Option<tokio::time::Instant>,
}

impl<R: AsyncRead + Unpin> Input<R> {
    pub fn new(inner: R, idle: Duration) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(CHUNK),
            pos: 0,
            idle,
            deadline: None,
        }
    }

    /// Bounds every later read by `deadline` as well as by the idle timeout.
    pub fn set_deadline(&mut self, deadline: tokio::time::Instant) {
        self.deadline = Some(deadline);
    }

    /// The underlying stream, for writing replies and for STARTTLS.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Drops every byte read but not yet consumed, and returns how many
    /// there were. After STARTTLS, anything the client sent behind the
    /// command in plaintext must never be taken as a command.
    pub fn discard_buffered(&mut self) -> usize {
        let n = self.buf.len() - self.pos;
        self.buf.clear();
        self.pos = 0;
        n
    }

    /// True when a whole line is already buffered: the session may then answer
    /// it before flushing (PIPELINING).
    pub fn has_line(&self) -> bool {
        memchr_lf(&self.buf[self.pos..]).is_some()
    }

    /// Reads more bytes, compacting the buffer first. Cancel-safe: bytes are
    /// appended only after a read completed.
    async fn fill(&mut self) -> Result<(), InputError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; CHUNK];
        let idle_end = tokio::time::Instant::now() + self.idle;
        let (until, error) = match self.deadline {
            Some(d) if d < idle_end => (d, InputError::Deadline),
            _ => (idle_end, InputError::Idle(self.idle)),
        };
        let n = match tokio::time::timeout_at(until, self.inner.read(&mut chunk)).await {
            Err(_) => return Err(error),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(0)) => return Err(InputError::Closed),
            Ok(Ok(n)) => n,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Returns the next line of at most `max` bytes (terminator included).
    ///
    /// # Errors
    /// [`InputError`] when the client closed, went idle or the read failed.
    pub async fn line(&mut self, max: usize) -> Result<Line, InputError> {
        let mut discarding = false;
        // Last byte dropped while discarding, to tell CR LF from a bare LF.
        let mut last_dropped = 0u8;
        // Bytes of the pending line already searched for LF: each byte is
        // scanned once, so a long line costs linear time.
        let mut scanned = 0usize;
        loop {
            let avail = &self.buf[self.pos..];
            if let Some(i) = memchr_lf(&avail[scanned..]).map(|i| i + scanned) {
                if discarding || i + 1 > max {
                    let before_lf = if i > 0 { avail[i - 1] } else { last_dropped };
                    self.pos += i + 1;
                    return Ok(Line::TooLong {
                        crlf: before_lf == b'\r',
                    });
                }
                let line = avail[..=i].to_vec();
                self.pos += i + 1;
                return Ok(Line::Complete(line));
            }
            if discarding || avail.len() > max {
                // Too long already: drop what we have and keep dropping until LF.
                discarding = true;
                if let Some(&b) = avail.last() {
                    last_dropped = b;
                }
                self.pos = self.buf.len();
            }
            scanned = self.buf.len() - self.pos;
            self.fill().await?;
        }
    }

    /// Capacity held by the buffer (to check the memory bound in tests).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

fn memchr_lf(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(data: &[u8]) -> Input<&[u8]> {
        Input::new(data, Duration::from_secs(5))
    }

    #[tokio::test]
    async fn frames_lines_with_either_terminator() {
        let mut i = input(b"EHLO a\r\nNOOP\nQUIT\r\n");
        assert_eq!(
            i.line(100).await.unwrap(),
            Line::Complete(b"EHLO a\r\n".to_vec())
        );
        assert!(i.has_line());
        assert_eq!(
            i.line(100).await.unwrap(),
            Line::Complete(b"NOOP\n".to_vec())
        );
        assert_eq!(
            i.line(100).await.unwrap(),
            Line::Complete(b"QUIT\r\n".to_vec())
        );
        assert!(!i.has_line());
        assert!(matches!(i.line(100).await, Err(InputError::Closed)));
    }

    #[tokio::test]
    async fn long_line_is_discarded_without_buffering() {
        let mut data = vec![b'x'; 5 * 1024 * 1024];
        data.extend_from_slice(b"\r\nNOOP\r\n");
        let mut i = input(&data);
        assert_eq!(i.line(4096).await.unwrap(), Line::TooLong { crlf: true });
        assert!(i.capacity() < 4 * CHUNK, "buffer grew to {}", i.capacity());
        assert_eq!(
            i.line(4096).await.unwrap(),
            Line::Complete(b"NOOP\r\n".to_vec())
        );
    }

    #[tokio::test]
    async fn line_exactly_at_limit_is_kept() {
        let mut i = input(b"abc\r\nabcd\r\nabcdefgh\n");
        assert_eq!(
            i.line(5).await.unwrap(),
            Line::Complete(b"abc\r\n".to_vec())
        );
        assert_eq!(i.line(5).await.unwrap(), Line::TooLong { crlf: true });
        assert_eq!(i.line(5).await.unwrap(), Line::TooLong { crlf: false });
    }

    #[tokio::test]
    async fn bare_lf_after_a_discarded_chunk_is_told_apart() {
        // The CR sits at the end of the discarded part, the LF in the next read.
        let mut data = vec![b'x'; 3 * CHUNK];
        data.push(b'\r');
        let (mut client, server) = tokio::io::duplex(CHUNK);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&data).await.unwrap();
            client.write_all(b"\nNOOP\r\n").await.unwrap();
            client
        });
        let mut i = Input::new(server, Duration::from_secs(5));
        assert_eq!(i.line(100).await.unwrap(), Line::TooLong { crlf: true });
        assert_eq!(
            i.line(100).await.unwrap(),
            Line::Complete(b"NOOP\r\n".to_vec())
        );
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn deadline_bounds_a_trickling_client() {
        let (_client, server) = tokio::io::duplex(64);
        let mut i = Input::new(server, Duration::from_secs(60));
        i.set_deadline(tokio::time::Instant::now() + Duration::from_millis(20));
        assert!(matches!(i.line(10).await, Err(InputError::Deadline)));
    }

    #[tokio::test]
    async fn idle_client_times_out() {
        let (_client, server) = tokio::io::duplex(64);
        let mut i = Input::new(server, Duration::from_millis(20));
        assert!(matches!(i.line(10).await, Err(InputError::Idle(_))));
    }
}
