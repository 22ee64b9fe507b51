//! A map by string key in copy-on-write shards: cloning it is one reference
//! count, and a change copies only the shard of the key it changes (a map of
//! 100,000 entries copies ~1,600 to add one). [`super::FlagSet`] keeps its
//! flags in one; a replica keeps its per-flag counters and prerequisite index
//! in others, and publishes new versions with arc-swap.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use super::{FastHash, SHARDS, shard_of};

/// See the module documentation. The shards are allocated on the first insert.
pub struct ShardedMap<K, V> {
    shards: Arc<Vec<Arc<HashMap<K, V, FastHash>>>>,
}

impl<K, V> Clone for ShardedMap<K, V> {
    fn clone(&self) -> Self {
        ShardedMap {
            shards: self.shards.clone(),
        }
    }
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            shards: Arc::default(),
        }
    }
}

impl<K, V> ShardedMap<K, V>
where
    K: Borrow<str> + Hash + Eq + Clone,
    V: Clone,
{
    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&V> {
        self.shards.get(shard_of(key))?.get(key)
    }

    /// Sets `key`, copying its shard if another clone shares it; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = shard_of(key.borrow());
        self.shard_mut(shard).insert(key, value)
    }

    /// Removes `key`, copying its shard (only) if it is there and another clone shares it.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.get(key)?;
        self.shard_mut(shard_of(key)).remove(key)
    }

    /// The value of `key` to change in place, copying its shard if another clone shares it.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.get(key)?;
        self.shard_mut(shard_of(key)).get_mut(key)
    }

    /// The value of `key` to change in place, inserted as `V::default()` when missing; copies
    /// its shard if another clone shares it.
    pub fn get_or_default(&mut self, key: &str) -> &mut V
    where
        K: for<'a> From<&'a str>,
        V: Default,
    {
        self.shard_mut(shard_of(key))
            .entry(K::from(key))
            .or_default()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|shard| shard.is_empty())
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    fn shard_mut(&mut self, shard: usize) -> &mut HashMap<K, V, FastHash> {
        let shards = Arc::make_mut(&mut self.shards);
        if shards.is_empty() {
            shards.extend((0..SHARDS).map(|_| Arc::new(HashMap::default())));
        }
        Arc::make_mut(&mut shards[shard])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharded_map_copies_only_the_shard_it_changes() {
        let mut before: ShardedMap<String, u32> = ShardedMap::default();
        for i in 0..1000 {
            before.insert(format!("flag-{i}"), i);
        }
        let mut after = before.clone();
        after.insert("flag-new".into(), 7);
        assert_eq!(after.remove("flag-3"), Some(3));
        assert_eq!(after.remove("flag-3"), None);
        assert_eq!(
            before.get("flag-3"),
            Some(&3),
            "the earlier state keeps its entries"
        );
        assert_eq!(before.get("flag-new"), None);
        assert_eq!(after.get("flag-new"), Some(&7));
        assert_eq!(after.iter().count(), 1000);
        *after.get_mut("flag-5").unwrap() += 100;
        assert_eq!(after.get_mut("missing"), None);
        *after.get_or_default("flag-zero") += 1;
        *after.get_or_default("flag-zero") += 1;
        assert_eq!(
            (after.get("flag-5"), after.get("flag-zero")),
            (Some(&105), Some(&2))
        );
        assert_eq!(
            (before.get("flag-5"), before.get("flag-zero")),
            (Some(&5), None),
            "changes in place leave the earlier state alone"
        );
        assert!(!after.is_empty() && ShardedMap::<String, u32>::default().is_empty());
        let changed = [
            shard_of("flag-new"),
            shard_of("flag-3"),
            shard_of("flag-5"),
            shard_of("flag-zero"),
        ];
        for shard in 0..SHARDS {
            let shared = Arc::ptr_eq(&before.shards[shard], &after.shards[shard]);
            assert_eq!(shared, !changed.contains(&shard), "shard {shard}");
        }
    }
}
