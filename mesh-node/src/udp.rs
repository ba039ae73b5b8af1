//! The tunnel socket's batched I/O (quinn-udp over a tokio socket):
//! `recvmmsg` with UDP GRO in, so that one system call brings many
//! datagrams; UDP GSO out, so that the datagrams one TUN read produced for
//! one peer leave in one `sendmsg`.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Room for one received buffer: a datagram of up to 64 KB, or that many
/// bytes of GRO-coalesced datagrams.
const RX_BUF: usize = 65536;
/// Buffers filled per `recvmmsg`.
const RX_BATCH: usize = 16;
/// Most bytes in one GSO send (the IPv6 payload length minus the UDP header,
/// with some room to spare).
const TX_MAX: usize = 65000;
/// Socket buffers asked for (the kernel caps them at `net.core.[rw]mem_max`).
const SOCK_BUF: usize = 4 << 20;

/// The tunnel socket.
pub struct Udp {
    pub sock: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// Sets up `sock` for batched I/O (GRO on, bigger buffers). Fragmentation
    /// stays as the kernel's default, so that peers behind a smaller path MTU
    /// still get every datagram.
    pub fn new(sock: UdpSocket) -> io::Result<Udp> {
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&sock), SOCK_BUF);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&sock), SOCK_BUF);
        undo_quic_options(&sock);
        Ok(Udp { sock, state })
    }

    /// Segments one GSO send may carry (1 without UDP GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Reads what is queued (without waiting) into `rx`; the number of
    /// filled buffers, or `WouldBlock`.
    pub fn try_recv(&self, rx: &mut RxBatch) -> io::Result<usize> {
        let RxBatch { bufs, meta } = rx;
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        self.sock
            .try_io(Interest::READABLE, || self.state.recv(UdpSockRef::from(&self.sock), &mut slices, meta))
    }

    /// Sends `contents` to `to`, as datagrams of `segment` bytes (the last
    /// may be shorter) when `segment` is given. Waits while the socket
    /// buffer is full; without GSO (or when the kernel refuses it), sends
    /// the datagrams one by one.
    pub async fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let segment = segment.filter(|s| *s > 0 && *s < contents.len());
        if segment.is_some() && self.max_segments() > 1 {
            let t = Transmit { destination: to, ecn: None, contents, segment_size: segment, src_ip: None };
            let r = self
                .sock
                .async_io(Interest::WRITABLE, || self.state.try_send(UdpSockRef::from(&self.sock), &t))
                .await;
            match r {
                Ok(()) => return,
                Err(e) => tracing::debug!(%to, "udp gso send: {e}; sending the datagrams one by one"),
            }
        }
        let segment = segment.unwrap_or(contents.len()).max(1);
        for d in contents.chunks(segment) {
            if let Err(e) = self.sock.send_to(d, to).await {
                tracing::debug!(%to, "udp send: {e}");
            }
        }
    }
}

/// Undoes what quinn-udp sets for QUIC and the tunnels do not want: "never
/// fragment" (back to path-MTU discovery, fragmenting when the path needs
/// it) and receive timestamps (which make the kernel timestamp every packet).
fn undo_quic_options(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: a valid socket descriptor and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            tracing::debug!(level, name, "setsockopt: {}", io::Error::last_os_error());
        }
    };
    set(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_WANT);
    set(libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
    set(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_WANT);
    set(libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0);
}

/// Receive buffers and what `recvmmsg` said about each.
pub struct RxBatch {
    pub bufs: Vec<Vec<u8>>,
    pub meta: Vec<RecvMeta>,
}

impl RxBatch {
    /// Buffers for one `recvmmsg` (about 1 MB).
    pub fn with_buffers() -> Self {
        RxBatch { bufs: vec![vec![0; RX_BUF]; RX_BATCH], meta: vec![RecvMeta::default(); RX_BATCH] }
    }

    /// No buffers (a placeholder while the real ones are lent out).
    pub fn empty() -> Self {
        RxBatch { bufs: Vec::new(), meta: Vec::new() }
    }

    /// The datagrams of buffer `i`: its source, and each datagram (GRO
    /// packs several of one size, the last maybe shorter).
    pub fn datagrams(&self, i: usize) -> (SocketAddr, std::slice::Chunks<'_, u8>) {
        let m = &self.meta[i];
        let data = &self.bufs[i][..m.len.min(self.bufs[i].len())];
        let stride = if m.stride == 0 { data.len().max(1) } else { m.stride };
        (m.addr, data.chunks(stride))
    }
}

/// Encrypted datagrams waiting to leave in one GSO send: all to one
/// address, all of one size except maybe the last.
#[derive(Default)]
pub struct TxBatch {
    buf: Vec<u8>,
    len: usize,
    to: Option<SocketAddr>,
    stride: usize,
    count: usize,
    /// The last datagram was shorter: nothing may follow it.
    closed: bool,
}

impl TxBatch {
    /// Room for the next datagram to `to`, of at most `max` bytes, at
    /// least `min` bytes long (what the encryption needs as output space);
    /// `None` when the batch must be sent first.
    pub fn room(&mut self, to: SocketAddr, max: usize, min: usize, max_segments: usize) -> Option<&mut [u8]> {
        if self.count > 0
            && (self.to != Some(to)
                || self.closed
                || max > self.stride
                || self.count >= max_segments
                || self.len + max.max(min) > TX_MAX)
        {
            return None;
        }
        let need = self.len + max.max(min);
        if self.buf.len() < need {
            self.buf.resize(need.max(TX_MAX), 0);
        }
        Some(&mut self.buf[self.len..])
    }

    /// Records the `n` bytes just written at the start of [`TxBatch::room`].
    pub fn commit(&mut self, to: SocketAddr, n: usize) {
        if self.count == 0 {
            self.to = Some(to);
            self.stride = n;
        } else if n < self.stride {
            self.closed = true;
        }
        self.len += n;
        self.count += 1;
    }

    /// What to send (destination, bytes, segment size), and empties the
    /// batch once `send` returns.
    pub fn take(&mut self) -> Option<(SocketAddr, &[u8], usize)> {
        if self.count == 0 {
            return None;
        }
        let out = (self.to?, &self.buf[..self.len], self.stride);
        self.len = 0;
        self.count = 0;
        self.closed = false;
        self.to = None;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_one_destination_and_one_size_with_a_shorter_last() {
        let a: SocketAddr = "[fd00::1]:1".parse().unwrap();
        let b: SocketAddr = "[fd00::2]:1".parse().unwrap();
        let mut t = TxBatch::default();
        for _ in 0..3 {
            t.room(a, 100, 148, 64).unwrap()[..100].fill(1);
            t.commit(a, 100);
        }
        assert!(t.room(b, 100, 148, 64).is_none(), "another destination");
        assert!(t.room(a, 101, 148, 64).is_none(), "a longer datagram");
        assert!(t.room(a, 100, 148, 3).is_none(), "over the segment limit");
        t.room(a, 60, 148, 64).unwrap();
        t.commit(a, 60);
        assert!(t.room(a, 60, 148, 64).is_none(), "nothing after a shorter one");
        let (to, bytes, seg) = t.take().unwrap();
        assert_eq!((to, bytes.len(), seg), (a, 360, 100));
        assert!(t.take().is_none());
        assert!(t.room(b, 1400, 148, 64).is_some());
    }

    #[test]
    fn gro_buffers_split_at_the_stride() {
        let mut rx = RxBatch::with_buffers();
        rx.meta[0].len = 2500;
        rx.meta[0].stride = 1000;
        rx.meta[1].len = 70;
        rx.meta[1].stride = 0;
        let sizes: Vec<usize> = rx.datagrams(0).1.map(<[u8]>::len).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        assert_eq!(rx.datagrams(1).1.map(<[u8]>::len).collect::<Vec<_>>(), [70]);
        rx.meta[2].len = RX_BUF + 10;
        assert_eq!(rx.datagrams(2).1.map(<[u8]>::len).sum::<usize>(), RX_BUF);
    }

    #[test]
    fn the_batch_stays_under_the_largest_datagram() {
        let a: SocketAddr = "[fd00::1]:1".parse().unwrap();
        let mut t = TxBatch::default();
        let mut n = 0;
        while t.room(a, 1452, 148, 128).is_some() {
            t.commit(a, 1452);
            n += 1;
        }
        assert_eq!(n, TX_MAX / 1452);
    }
}
