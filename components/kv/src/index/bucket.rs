//! One map of a shard: open addressing with linear probing over slots that hold the key and
//! its value together, so finding a block touches one cache line (hashbrown keeps its control
//! bytes apart from its slots: two misses a block in an index of millions), and the slot a key
//! starts at is known before it is read, so a batch of blocks can be prefetched ahead of its
//! updates. Removal shifts the rest of the cluster back (no tombstones). Keys are uniformly
//! distributed already (sequence hashes); key 0 is kept aside, a 0 slot key meaning empty.

/// Most of a bucket's slots in use before it doubles (75%: about 2.5 probes per hit, 8.5 per
/// miss on average).
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;
const MIN_SLOTS: usize = 8;

/// Entries `slots` slots hold before they double.
const fn room(slots: usize) -> usize {
    slots * LOAD_NUM / LOAD_DEN
}

struct Slot<V> {
    key: u64,
    value: V,
}

pub(super) struct Bucket<V> {
    /// A power of two in length (or empty).
    slots: Box<[Slot<V>]>,
    /// Entries in `slots`.
    len: usize,
    zero: Option<V>,
}

/// A key's first slot: bits of the key's middle (the index takes its low bits for the shard
/// and its top bits for the bucket), spread by one multiply.
fn home(key: u64, mask: usize) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

impl<V: Default> Bucket<V> {
    pub(super) fn new() -> Self {
        Self {
            slots: Box::new([]),
            len: 0,
            zero: None,
        }
    }

    /// Room for `n` entries without growing.
    pub(super) fn with_capacity(n: usize) -> Self {
        let mut b = Self::new();
        b.resize(Self::slots_for(n));
        b
    }

    /// The fewest slots (a power of two) with room for `n` entries.
    fn slots_for(n: usize) -> usize {
        (n * LOAD_DEN)
            .div_ceil(LOAD_NUM)
            .next_power_of_two()
            .max(MIN_SLOTS)
    }

    pub(super) fn len(&self) -> usize {
        self.len + self.zero.is_some() as usize
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    fn find(&self, key: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = home(key, mask);
        loop {
            match self.slots[i].key {
                k if k == key => return Some(i),
                0 => return None,
                _ => i = (i + 1) & mask,
            }
        }
    }

    pub(super) fn get(&self, key: u64) -> Option<&V> {
        if key == 0 {
            return self.zero.as_ref();
        }
        self.find(key).map(|i| &self.slots[i].value)
    }

    pub(super) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        if key == 0 {
            return self.zero.as_mut();
        }
        self.find(key).map(|i| &mut self.slots[i].value)
    }

    pub(super) fn contains_key(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// `key`'s value, a default one inserted if absent.
    pub(super) fn get_or_insert(&mut self, key: u64) -> &mut V {
        if key == 0 {
            return self.zero.get_or_insert_with(V::default);
        }
        if let Some(i) = self.find(key) {
            return &mut self.slots[i].value;
        }
        if self.len + 1 > room(self.slots.len()) {
            self.resize(Self::slots_for(self.len + 1).max(self.slots.len() * 2));
        }
        let i = self.vacant(key);
        self.slots[i].key = key;
        self.len += 1;
        &mut self.slots[i].value
    }

    /// The first empty slot of `key`'s probe sequence (there is one: the load is bounded).
    fn vacant(&self, key: u64) -> usize {
        let mask = self.mask();
        let mut i = home(key, mask);
        while self.slots[i].key != 0 {
            i = (i + 1) & mask;
        }
        i
    }

    fn resize(&mut self, n: usize) {
        let fresh: Box<[Slot<V>]> = (0..n)
            .map(|_| Slot {
                key: 0,
                value: V::default(),
            })
            .collect();
        let old = std::mem::replace(&mut self.slots, fresh);
        for s in old.into_vec() {
            if s.key != 0 {
                let i = self.vacant(s.key);
                self.slots[i] = s;
            }
        }
    }

    pub(super) fn remove(&mut self, key: u64) -> Option<V> {
        if key == 0 {
            return self.zero.take();
        }
        let i = self.find(key)?;
        Some(self.remove_at(i))
    }

    /// Empties slot `i`, then moves later entries of its cluster back into the hole where
    /// their probe sequence allows, so lookups never stop short at it.
    fn remove_at(&mut self, mut i: usize) -> V {
        let mask = self.mask();
        let out = std::mem::take(&mut self.slots[i].value);
        self.slots[i].key = 0;
        self.len -= 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j].key;
            if k == 0 {
                return out;
            }
            // The hole is on the way from this entry's home to where it sits: move it back.
            let h = home(k, mask);
            if j.wrapping_sub(h) & mask >= j.wrapping_sub(i) & mask {
                self.slots.swap(i, j);
                i = j;
            }
        }
    }

    /// Keeps the entries for which `keep` is true; each entry is visited once.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(u64, &mut V) -> bool) {
        if let Some(v) = self.zero.as_mut() {
            if !keep(0, v) {
                self.zero = None;
            }
        }
        if self.len == 0 {
            return;
        }
        let mask = self.mask();
        // Start after an empty slot: no cluster wraps past the start, so an entry moved back
        // by a removal always comes from a slot not visited yet.
        let start = (0..self.slots.len())
            .find(|&i| self.slots[i].key == 0)
            .expect("the load is bounded: a slot is empty");
        let mut i = (start + 1) & mask;
        while i != start {
            let k = self.slots[i].key;
            if k != 0 && !keep(k, &mut self.slots[i].value) {
                self.remove_at(i);
                // Slot i may hold a moved entry now: look at it again.
                continue;
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading `key`'s first slot into the cache.
    pub(super) fn prefetch(&self, key: u64) {
        if self.slots.is_empty() {
            return;
        }
        let p = self.slots.as_ptr().wrapping_add(home(key, self.mask()));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint; it never faults and `p` is inside `slots`.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::Bucket;

    /// Inserts, removals and retains against a plain map (clusters that wrap around the end of
    /// small tables, and key 0).
    #[test]
    fn bucket_matches_a_plain_map() {
        let mut b: Bucket<u64> = Bucket::new();
        let mut r: HashMap<u64, u64> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Keys from a small set (many removals hit), some of them 0.
            let key = match x.is_multiple_of(5) {
                true => 0,
                false => (x % 700).wrapping_mul(0x1_0000_0001),
            };
            match x % 7 {
                0..=3 => {
                    *b.get_or_insert(key) = step;
                    r.insert(key, step);
                }
                4 | 5 => assert_eq!(b.remove(key), r.remove(&key)),
                _ if step % 500 == 0 => {
                    b.retain(|k, v| (k ^ *v) % 3 != 0);
                    r.retain(|k, v| (k ^ *v) % 3 != 0);
                }
                _ => assert_eq!(b.get(key), r.get(&key)),
            }
            assert_eq!(b.len(), r.len());
        }
        for (k, v) in &r {
            assert_eq!(b.get(*k), Some(v));
        }
        let mut seen = 0;
        b.retain(|k, v| {
            assert_eq!(r.get(&k), Some(&*v), "each entry once");
            seen += 1;
            true
        });
        assert_eq!(seen, r.len());
    }
}
