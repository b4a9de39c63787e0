//! Per-channel order: events run concurrently, but two events with the same
//! `d.channel_id` on one dispatch connection hand their frames to sessions
//! in the order they were read.
//!
//! Each event gets a [`Turn`]: a receiver that resolves when the previous
//! event on its channel has fanned out (or failed), and a sender its
//! successor waits on. The chain lives only as long as events are in
//! flight, so memory is bounded by `max_inflight`.

use std::collections::HashMap;

use tokio::sync::oneshot;

/// When an event may fan out.
pub struct Turn {
    previous: Option<oneshot::Receiver<()>>,
    /// Dropped when this event is done, which releases the next one.
    _done: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// A turn with no predecessor (events without a channel).
    pub fn free() -> Turn {
        Turn {
            previous: None,
            _done: None,
        }
    }

    /// Waits until the previous event on the channel is done.
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.as_mut() {
            // An error means the predecessor finished without sending,
            // which is how every predecessor finishes.
            let _ = previous.await;
            self.previous = None;
        }
    }
}

/// The chains of one dispatch connection, by channel id.
#[derive(Default)]
pub struct Order {
    last: HashMap<String, oneshot::Receiver<()>>,
}

/// Above this many channels, finished chains are swept.
const SWEEP_AT: usize = 4096;

impl Order {
    /// The turn for an event on `channel` (`None`: no order to keep).
    pub fn turn(&mut self, channel: Option<&str>) -> Turn {
        let Some(channel) = channel else {
            return Turn::free();
        };
        if self.last.len() >= SWEEP_AT {
            // Keep only chains whose last event is still running.
            self.last
                .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        let (done, next) = oneshot::channel();
        let previous = self.last.insert(channel.to_owned(), next);
        Turn {
            previous,
            _done: Some(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // Paused time: a timeout that can only end by the clock ends at once,
    // so "still waiting" is checked without real waits.
    #[tokio::test(start_paused = true)]
    async fn same_channel_waits_other_channels_do_not() {
        let mut order = Order::default();
        let first = order.turn(Some("1"));
        let mut second = order.turn(Some("1"));
        let mut other = order.turn(Some("2"));
        let mut none = order.turn(None);
        tokio::time::timeout(Duration::from_millis(50), other.wait())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_millis(50), none.wait())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second.wait())
                .await
                .is_err()
        );
        drop(first);
        tokio::time::timeout(Duration::from_millis(50), second.wait())
            .await
            .unwrap();
    }

    #[test]
    fn finished_chains_are_swept() {
        let mut order = Order::default();
        for i in 0..SWEEP_AT {
            drop(order.turn(Some(&i.to_string())));
        }
        let _live = order.turn(Some("x"));
        assert_eq!(order.last.len(), 1);
    }
}
