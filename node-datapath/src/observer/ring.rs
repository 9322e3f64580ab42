//! The flow ring: the last N records, each with a sequence number that only
//! grows, so a reader can tell how many it missed; and the pure selection
//! that answers a query (last N, time window, filter) with its lost count.

use std::collections::VecDeque;

/// One record in the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<T> {
    /// 0 for the first record ever pushed, then +1 per record.
    pub seq: u64,
    /// Wall-clock time of the record, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    pub item: T,
}

/// A bounded ring of records; pushing into a full ring overwrites the oldest.
#[derive(Debug)]
pub struct Ring<T> {
    buf: VecDeque<Entry<T>>,
    capacity: usize,
    next_seq: u64,
    /// Latest time among overwritten records (`None`: nothing overwritten).
    evicted_max_ns: Option<i64>,
}

/// What a reader asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// The last `number` matching records; 0: every matching record held.
    pub number: u64,
    /// Only records at or after this time.
    pub since_ns: Option<i64>,
    /// Only records at or before this time.
    pub until_ns: Option<i64>,
}

/// The answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection<T> {
    /// Records the query would have wanted but the ring overwrote. Overwritten
    /// records cannot be filtered any more, so with a filter or a `since` this
    /// is an upper bound: it never exceeds what was overwritten, nor (with
    /// `number`) what is missing from the answer.
    pub lost: u64,
    /// Matching records, oldest first.
    pub entries: Vec<Entry<T>>,
    /// The sequence number the next pushed record will get: a follower
    /// continues after `next_seq - 1`.
    pub next_seq: u64,
}

// === impl Ring ===

impl<T: Clone> Ring<T> {
    /// An empty ring holding at most `capacity` records (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            buf: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
            next_seq: 0,
            evicted_max_ns: None,
        }
    }

    /// Appends a record, overwriting the oldest when full; returns its sequence number.
    pub fn push(&mut self, time_ns: i64, item: T) -> u64 {
        if self.buf.len() == self.capacity
            && let Some(old) = self.buf.pop_front()
        {
            self.evicted_max_ns = Some(
                self.evicted_max_ns
                    .map_or(old.time_ns, |t| t.max(old.time_ns)),
            );
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.buf.push_back(Entry { seq, time_ns, item });
        seq
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The most records the ring holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records ever pushed.
    pub fn pushed(&self) -> u64 {
        self.next_seq
    }

    /// Records pushed and since overwritten.
    pub fn overwritten(&self) -> u64 {
        self.next_seq - self.buf.len() as u64
    }

    /// Answers `query` with the records `keep` accepts.
    pub fn select(&self, query: &Query, keep: impl Fn(&T) -> bool) -> Selection<T> {
        let in_window = |e: &&Entry<T>| {
            query.since_ns.is_none_or(|s| e.time_ns >= s)
                && query.until_ns.is_none_or(|u| e.time_ns <= u)
        };
        let mut entries: Vec<Entry<T>> = if query.number == 0 {
            self.buf
                .iter()
                .filter(in_window)
                .filter(|e| keep(&e.item))
                .cloned()
                .collect()
        } else {
            let mut newest_first: Vec<Entry<T>> = self
                .buf
                .iter()
                .rev()
                .filter(in_window)
                .filter(|e| keep(&e.item))
                .take(usize::try_from(query.number).unwrap_or(usize::MAX))
                .cloned()
                .collect();
            newest_first.reverse();
            newest_first
        };
        entries.shrink_to_fit();
        let overwritten = self.overwritten();
        // Did the ring overwrite records inside the asked-for window?
        let window_overwritten = match (self.evicted_max_ns, query.since_ns, query.until_ns) {
            (None, _, _) => false,
            // Records are pushed in (close to) time order: everything overwritten
            // precedes what is held, so a window reaching back past the newest
            // overwritten record lost some.
            (Some(evicted), Some(since), _) => since <= evicted,
            // No lower bound: "the last N" (or "all") reaches back indefinitely.
            (Some(_), None, _) => true,
        };
        let lost = if !window_overwritten {
            0
        } else if query.number == 0 {
            // "All" without a lower bound: nothing is missing from what was asked.
            if query.since_ns.is_some() {
                overwritten
            } else {
                0
            }
        } else {
            let missing = query.number.saturating_sub(entries.len() as u64);
            missing.min(overwritten)
        };
        Selection {
            lost,
            entries,
            next_seq: self.next_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring of `capacity` holding records 0..n with time = 100 * seq.
    fn ring_with(capacity: usize, n: u64) -> Ring<u64> {
        let mut r = Ring::new(capacity);
        for i in 0..n {
            assert_eq!(r.push(i as i64 * 100, i), i);
        }
        r
    }

    fn items(s: &Selection<u64>) -> Vec<u64> {
        s.entries.iter().map(|e| e.item).collect()
    }

    #[test]
    fn a_full_ring_overwrites_the_oldest_and_sequence_numbers_keep_growing() {
        let r = ring_with(3, 5);
        assert_eq!(r.len(), 3);
        assert_eq!(r.pushed(), 5);
        assert_eq!(r.overwritten(), 2);
        let all = r.select(&Query::default(), |_| true);
        assert_eq!(
            all.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(all.next_seq, 5);
    }

    #[test]
    fn asking_for_more_than_the_ring_held_reports_the_overwritten_ones_as_lost() {
        let r = ring_with(3, 10);
        let s = r.select(
            &Query {
                number: 5,
                ..Query::default()
            },
            |_| true,
        );
        assert_eq!(items(&s), [7, 8, 9]);
        assert_eq!(s.lost, 2);
        // Never more than was overwritten.
        let s = r.select(
            &Query {
                number: 100,
                ..Query::default()
            },
            |_| true,
        );
        assert_eq!(s.lost, 7);
    }

    #[test]
    fn asking_for_no_more_than_held_or_before_anything_was_overwritten_loses_nothing() {
        let r = ring_with(3, 10);
        assert_eq!(
            r.select(
                &Query {
                    number: 3,
                    ..Query::default()
                },
                |_| true
            )
            .lost,
            0
        );
        assert_eq!(r.select(&Query::default(), |_| true).lost, 0);
        let young = ring_with(8, 5);
        let s = young.select(
            &Query {
                number: 50,
                ..Query::default()
            },
            |_| true,
        );
        assert_eq!((s.lost, s.entries.len()), (0, 5));
    }

    #[test]
    fn a_since_older_than_the_oldest_held_record_reports_what_was_overwritten() {
        let r = ring_with(3, 10); // holds times 700, 800, 900; overwrote 0..=600
        let s = r.select(
            &Query {
                since_ns: Some(650),
                ..Query::default()
            },
            |_| true,
        );
        assert_eq!((s.lost, items(&s)), (0, vec![7, 8, 9]));
        let s = r.select(
            &Query {
                since_ns: Some(600),
                ..Query::default()
            },
            |_| true,
        );
        assert_eq!((s.lost, items(&s)), (7, vec![7, 8, 9]));
    }

    #[test]
    fn until_and_the_filter_narrow_the_answer_and_number_takes_the_newest() {
        let r = ring_with(10, 10);
        let q = Query {
            number: 2,
            since_ns: Some(200),
            until_ns: Some(800),
        };
        let s = r.select(&q, |i| i % 2 == 0);
        assert_eq!((s.lost, items(&s)), (0, vec![6, 8]));
    }

    #[test]
    fn a_ring_of_capacity_zero_still_holds_one_record() {
        let r = ring_with(0, 2);
        assert_eq!((r.capacity(), r.len(), r.overwritten()), (1, 1, 1));
    }
}
