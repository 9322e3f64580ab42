// SPDX-License-Identifier: Apache-2.0
//! Readers of the datapath's event ring buffer (`mb_events`). The ring buffer
//! is pinned and shared by both programs; one reader at a time consumes it.

use std::{
    os::fd::AsFd,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::io::{Interest, unix::AsyncFd};

use super::{Error, abi::TraceEventRaw, types::DatapathEvent};

/// A blocking reader. Get one from [`super::Datapath::events`].
pub struct EventReader {
    ring: RingBuf<MapData>,
}

/// A reader for tokio; needs a running tokio runtime (with IO enabled).
pub struct AsyncEventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

// === impl EventReader ===

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// The next event already in the buffer, without waiting. Records too
    /// short to decode (none today) are skipped.
    pub fn try_next(&mut self) -> Option<DatapathEvent> {
        next_event(&mut self.ring)
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<DatapathEvent>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.try_next() {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ms = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.ring.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(Error::Events(e.into())),
            }
        }
    }

    /// Drains every event currently in the buffer.
    pub fn drain(&mut self) -> Vec<DatapathEvent> {
        std::iter::from_fn(|| self.try_next()).collect()
    }

    /// Turns this into a tokio reader.
    pub fn into_async(self) -> Result<AsyncEventReader, Error> {
        #[allow(unsafe_code)]
        // SAFETY: `register` needs the fd to stay open and unchanged for the
        // AsyncFd's lifetime. The AsyncFd owns the RingBuf, which owns the
        // map fd (closed only when the RingBuf drops) and always returns
        // that same fd from `as_raw_fd`.
        let ring = unsafe { AsyncFd::register_with_interest(self.ring, Interest::READABLE) }
            .map_err(|e| Error::Events(e.into_parts().1))?;
        Ok(AsyncEventReader { ring })
    }
}

// === impl AsyncEventReader ===

impl AsyncEventReader {
    /// The next event, waiting for the kernel to produce one.
    pub async fn next(&mut self) -> Result<DatapathEvent, Error> {
        loop {
            let mut guard = self.ring.readable_mut().await.map_err(Error::Events)?;
            if let Some(ev) = next_event(guard.get_inner_mut()) {
                return Ok(ev);
            }
            // Empty: wait for the next epoll edge.
            guard.clear_ready();
        }
    }
}

fn next_event(ring: &mut RingBuf<MapData>) -> Option<DatapathEvent> {
    loop {
        let item = ring.next()?;
        if let Some(raw) = TraceEventRaw::from_bytes(&item) {
            return Some(raw.into());
        }
    }
}
