//! [`IdleSet`]: the idle workers (no load accounted) in id order, with rank and select, so a
//! route draws among thousands of tied idle workers without visiting them.
//!
//! A sorted list cut into chunks of at most [`CHUNK`] ids: insert and remove touch one chunk
//! (a memmove of at most a few KiB), rank and select walk the chunks' lengths (10 steps at 10k
//! workers). A balanced order-statistic tree would be O(log n) everywhere, but at the fleet
//! sizes one router holds (10k-100k workers) the chunk walk is a few hundred nanoseconds and
//! the code is a page.

use dynamo_protocols::kv::WorkerId;

const CHUNK: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct IdleSet {
    /// Sorted, non-empty chunks; every id in a chunk is below every id of the next.
    chunks: Vec<Vec<WorkerId>>,
    len: usize,
}

impl IdleSet {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The chunk where `w` is or would go.
    fn chunk_of(&self, w: WorkerId) -> usize {
        let i = self
            .chunks
            .partition_point(|c| c.last().is_some_and(|l| *l < w));
        i.min(self.chunks.len().saturating_sub(1))
    }

    pub(crate) fn insert(&mut self, w: WorkerId) {
        if self.chunks.is_empty() {
            self.chunks.push(vec![w]);
            self.len = 1;
            return;
        }
        let c = self.chunk_of(w);
        let chunk = &mut self.chunks[c];
        let Err(at) = chunk.binary_search(&w) else {
            return;
        };
        chunk.insert(at, w);
        self.len += 1;
        if chunk.len() > CHUNK {
            let tail = chunk.split_off(CHUNK / 2);
            self.chunks.insert(c + 1, tail);
        }
    }

    pub(crate) fn remove(&mut self, w: WorkerId) {
        if self.chunks.is_empty() {
            return;
        }
        let c = self.chunk_of(w);
        let chunk = &mut self.chunks[c];
        if let Ok(at) = chunk.binary_search(&w) {
            chunk.remove(at);
            self.len -= 1;
            if chunk.is_empty() {
                self.chunks.remove(c);
            }
        }
    }

    pub(crate) fn contains(&self, w: WorkerId) -> bool {
        !self.chunks.is_empty() && self.chunks[self.chunk_of(w)].binary_search(&w).is_ok()
    }

    /// How many ids are below `w`.
    pub(crate) fn rank(&self, w: WorkerId) -> usize {
        let mut below = 0;
        for chunk in &self.chunks {
            if chunk.last().is_some_and(|l| *l < w) {
                below += chunk.len();
            } else {
                return below + chunk.partition_point(|x| *x < w);
            }
        }
        below
    }

    /// The `k`-th id (from 0) in order.
    pub(crate) fn select(&self, mut k: usize) -> Option<WorkerId> {
        for chunk in &self.chunks {
            if k < chunk.len() {
                return Some(chunk[k]);
            }
            k -= chunk.len();
        }
        None
    }

    /// The ids, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.chunks.iter().flatten().copied()
    }

    /// The first id not in `skip` (sorted).
    pub(crate) fn first_not_in(&self, skip: &[WorkerId]) -> Option<WorkerId> {
        self.chunks
            .iter()
            .flatten()
            .find(|w| skip.binary_search(w).is_err())
            .copied()
    }

    /// The `k`-th id (from 0) of this set without `skip` (sorted, all members).
    pub(crate) fn select_without(&self, skip: &[WorkerId], k: usize) -> Option<WorkerId> {
        let mut at = k;
        for &s in skip {
            if self.rank(s) <= at {
                at += 1;
            } else {
                break;
            }
        }
        self.select(at)
    }

    /// The `k`-th (from 0) in id order of this set without `skip` (sorted, all members) joined
    /// with `extra` (sorted by id, none of them in the set without `skip`), and its overlap
    /// (`default` for the set's own).
    pub(crate) fn select_merged<T: Copy>(
        &self,
        skip: &[WorkerId],
        extra: &[(WorkerId, T)],
        k: usize,
        default: T,
    ) -> Option<(WorkerId, T)> {
        for (j, &(v, t)) in extra.iter().enumerate() {
            // Members of the set (without `skip`) before `v`.
            let before = self.rank(v) - skip.partition_point(|s| *s < v);
            if k < before + j {
                return self.select_without(skip, k - j).map(|w| (w, default));
            }
            if k == before + j {
                return Some((v, t));
            }
        }
        self.select_without(skip, k - extra.len())
            .map(|w| (w, default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Against a `BTreeSet`: any sequence of inserts and removes (enough to split chunks)
        /// leaves the same members, and rank, select and the merged selection agree with
        /// the sorted list.
        #[test]
        fn matches_a_sorted_set(
            ops in proptest::collection::vec((0u64..3000, any::<bool>()), 1..4000),
            skip_every in 2usize..9,
            extra in proptest::collection::btree_set(3000u64..3100, 0..5),
        ) {
            let (mut set, mut model) = (IdleSet::default(), BTreeSet::new());
            for (w, add) in ops {
                // Even ids: the extras below are odd.
                let w = w * 2;
                if add {
                    set.insert(WorkerId(w));
                    model.insert(WorkerId(w));
                } else {
                    set.remove(WorkerId(w));
                    model.remove(&WorkerId(w));
                }
            }
            prop_assert_eq!(set.len(), model.len());
            let sorted: Vec<WorkerId> = model.iter().copied().collect();
            for (i, &w) in sorted.iter().enumerate().step_by(7) {
                prop_assert!(set.contains(w));
                prop_assert_eq!(set.rank(w), i);
                prop_assert_eq!(set.select(i), Some(w));
            }
            prop_assert_eq!(set.select(sorted.len()), None);
            let skip: Vec<WorkerId> = sorted.iter().step_by(skip_every).copied().collect();
            // Interleave the extras among the members: odd ids, between theirs.
            let extra: Vec<(WorkerId, u64)> =
                extra.iter().map(|&e| (WorkerId((e - 3000) * 60 + 1), e)).collect();
            let mut want: Vec<(WorkerId, u64)> = sorted
                .iter()
                .filter(|w| !skip.contains(w))
                .map(|&w| (w, 0))
                .chain(extra.iter().copied())
                .collect();
            want.sort_unstable();
            for (k, &w) in want.iter().enumerate() {
                prop_assert_eq!(set.select_merged(&skip, &extra, k, 0), Some(w));
            }
            prop_assert_eq!(set.select_merged(&skip, &extra, want.len(), 0), None);
        }
    }
}
