//! The seam between the data plane and NCCL, and the bound on every collective.
//!
//! NCCL queues a group of sends and receives on a CUDA stream and returns at once; a peer that
//! died leaves that work pending forever. So every exchange here is posted, then polled until
//! it completes or its deadline passes, and on a deadline (or an asynchronous NCCL error) the
//! communicator is aborted (`ncclCommAbort`), which frees the stream; the caller reports the
//! node suspect and re-plans, as for a broken gRPC stream.

use std::time::{Duration, Instant};

use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;

use super::row_encoding::RowEncoding;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("collective did not complete within {0:?}; communicator aborted")]
    Timeout(Duration),
    #[error("communicator failed: {0}")]
    Failed(String),
    #[error("communicator was aborted")]
    Aborted,
    #[error("rank {rank} is not in a communicator of {size}")]
    BadRank { rank: usize, size: usize },
    /// A peer announced more than the communicator's frame bound; it was cut off unread.
    #[error("rank {rank} announced a frame of {len} bytes, over the limit of {max}: cut off")]
    FrameTooLarge { rank: usize, len: u64, max: u64 },
}

/// One group of point-to-point transfers (an all-to-all is one group).
#[derive(Debug, Clone, Default)]
pub struct Pending<B> {
    /// `(peer rank, buffer)` to send.
    pub sends: Vec<(usize, B)>,
    /// `(peer rank, length)` to receive.
    pub recvs: Vec<(usize, usize)>,
}

pub trait Communicator: Send {
    /// Host bytes for the in-memory fake; device buffers for NCCL.
    type Buffer;

    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Queues the group; returns without waiting for it.
    fn post(&mut self, group: Pending<Self::Buffer>) -> Result<(), CommError>;
    /// `Some(received buffers, in the order of the group's recvs)` once the posted group is
    /// done; `Err` when the communicator failed.
    fn poll(&mut self) -> Result<Option<Vec<Self::Buffer>>, CommError>;
    /// Like [`Communicator::poll`], but may block up to `at_most` for the group to complete
    /// (transports that can be woken override it; the default polls around a short sleep).
    fn wait(&mut self, at_most: Duration) -> Result<Option<Vec<Self::Buffer>>, CommError> {
        if let Some(done) = self.poll()? {
            return Ok(Some(done));
        }
        std::thread::sleep(at_most.min(Duration::from_micros(50)));
        self.poll()
    }
    /// Tears the communicator down without waiting for peers.
    fn abort(&mut self);
    /// A transfer buffer holding `bytes` (the bytes themselves on the host, a copy in device
    /// memory for NCCL).
    fn upload(&self, bytes: Vec<u8>) -> Result<Self::Buffer, CommError>;
    /// The bytes of a received buffer.
    fn download(&self, buffer: Self::Buffer) -> Result<Vec<u8>, CommError>;
    /// How many bytes `buffer` carries (a buffer made on the device is checked by its length
    /// before it is sent, as host bytes are).
    fn buffer_bytes(&self, buffer: &Self::Buffer) -> usize;
    /// Runs `experts` on received rows (`[routes.rows(), hidden]` in `encoding`) where the
    /// transport put them, returning the `[pairs, hidden]` f32 outputs ready to send and how
    /// many values they hold: `Some` when the rows can stay there (NCCL, with the experts on
    /// the same GPU); `None` sends the caller through host memory.
    fn run_in_place(
        &self,
        _experts: &dyn ExpertBackend,
        _layer: usize,
        _rows: &Self::Buffer,
        _encoding: RowEncoding,
        _routes: &ExpertRoutes,
    ) -> Option<Result<(Self::Buffer, usize), String>> {
        None
    }
}

/// Posts `group` and waits for it at most `timeout`; aborts the communicator on a timeout or
/// an error, so a dead peer costs one timeout, never a hung router.
pub fn run_bounded<C: Communicator + ?Sized>(
    comm: &mut C,
    group: Pending<C::Buffer>,
    timeout: Duration,
) -> Result<Vec<C::Buffer>, CommError> {
    let size = comm.size();
    let bad = group
        .sends
        .iter()
        .map(|(r, _)| *r)
        .chain(group.recvs.iter().map(|(r, _)| *r))
        .find(|&r| r >= size);
    if let Some(rank) = bad {
        return Err(CommError::BadRank { rank, size });
    }
    let deadline = Instant::now() + timeout;
    if let Err(e) = comm.post(group) {
        comm.abort();
        return Err(e);
    }
    loop {
        // Wake at least every millisecond to check the deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        match comm.wait(left.min(Duration::from_millis(1))) {
            Ok(Some(received)) => return Ok(received),
            Ok(None) if Instant::now() >= deadline => {
                comm.abort();
                return Err(CommError::Timeout(timeout));
            }
            Ok(None) => {}
            Err(e) => {
                comm.abort();
                return Err(e);
            }
        }
    }
}

/// An in-memory communicator group for tests (host bytes through [`super::mailbox`]).
pub mod fake {
    pub use super::super::mailbox::{host_group as group, FakeComm};
}

#[cfg(test)]
mod tests {
    use super::fake::group;
    use super::*;
    use crate::collective::plan::{ExchangePlan, PeerCounts};

    /// The router (rank 0) sends counts, then rows, to two nodes, which answer one output row
    /// per pair: the whole layer's protocol over the fake.
    #[test]
    fn counts_then_all_to_all_then_combine() {
        let (mut comms, _) = group(3);
        let mut nodes = comms.split_off(1);
        let mut router = comms.pop().unwrap();
        let hidden = 2;
        let counts = [
            PeerCounts { rows: 2, pairs: 3 },
            PeerCounts { rows: 1, pairs: 2 },
        ];
        let plan = ExchangePlan::new(&counts, hidden, &[]);
        let rows: Vec<u8> = (0..plan.hidden_bytes as u8).collect();

        let timeout = Duration::from_secs(1);
        let sends = plan
            .peers
            .iter()
            .map(|p| (p.rank, p.counts.encode().to_vec()))
            .collect();
        run_bounded(
            &mut router,
            Pending {
                sends,
                recvs: vec![],
            },
            timeout,
        )
        .unwrap();
        let mut got_counts = Vec::new();
        for node in &mut nodes {
            let got = run_bounded(
                node,
                Pending {
                    sends: vec![],
                    recvs: vec![(0, 8)],
                },
                timeout,
            )
            .unwrap();
            let bytes: [u8; 8] = got[0].as_slice().try_into().unwrap();
            got_counts.push(PeerCounts::decode(&bytes, 1024).unwrap());
        }
        assert_eq!(got_counts, counts);

        let sends = plan
            .peers
            .iter()
            .map(|p| (p.rank, rows[p.hidden.clone()].to_vec()))
            .collect();
        run_bounded(
            &mut router,
            Pending {
                sends,
                recvs: vec![],
            },
            timeout,
        )
        .unwrap();
        for (node, c) in nodes.iter_mut().zip(counts) {
            let len = c.rows as usize * hidden * 4;
            let got = run_bounded(
                node,
                Pending {
                    sends: vec![],
                    recvs: vec![(0, len)],
                },
                timeout,
            )
            .unwrap();
            assert_eq!(got[0].len(), len);
            // Answer: one output row per pair.
            let out = vec![node.rank() as u8; c.pairs as usize * hidden * 4];
            run_bounded(
                node,
                Pending {
                    sends: vec![(0, out)],
                    recvs: vec![],
                },
                timeout,
            )
            .unwrap();
        }
        let recvs = plan
            .peers
            .iter()
            .map(|p| (p.rank, p.outputs.len()))
            .collect();
        let outputs = run_bounded(
            &mut router,
            Pending {
                sends: vec![],
                recvs,
            },
            timeout,
        )
        .unwrap();
        assert_eq!(outputs[0], vec![1u8; 24]);
        assert_eq!(outputs[1], vec![2u8; 16]);
    }

    #[test]
    fn a_dead_peer_costs_one_timeout_and_aborts_the_communicator() {
        let (mut comms, dead) = group(3);
        dead.lock().unwrap()[2] = true;
        let router = &mut comms[0];
        let started = Instant::now();
        let err = run_bounded(
            router,
            Pending {
                sends: vec![(1, vec![0; 8]), (2, vec![0; 8])],
                recvs: vec![(2, 8)],
            },
            Duration::from_millis(50),
        )
        .unwrap_err();
        assert_eq!(err, CommError::Timeout(Duration::from_millis(50)));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(router.aborted);
        // An aborted communicator refuses further work instead of hanging.
        let again = run_bounded(router, Pending::default(), Duration::from_millis(50));
        assert_eq!(again.unwrap_err(), CommError::Aborted);
    }

    /// NCCL allows a rank to send to itself inside a group (a one-rank communicator's
    /// all-to-all is exactly that); the bounded wait must too.
    #[test]
    fn a_rank_can_exchange_with_itself() {
        let (mut comms, _) = group(1);
        let received = run_bounded(
            &mut comms[0],
            Pending {
                sends: vec![(0, vec![1, 2, 3])],
                recvs: vec![(0, 3)],
            },
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!(received, vec![vec![1, 2, 3]]);
    }

    #[test]
    fn ranks_outside_the_communicator_are_refused() {
        let (mut comms, _) = group(2);
        let err = run_bounded(
            &mut comms[0],
            Pending {
                sends: vec![(5, vec![1])],
                recvs: vec![],
            },
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert_eq!(err, CommError::BadRank { rank: 5, size: 2 });
    }
}
