//! The user-space side of a hook table's CIDR tries: which rules each stored prefix stands for.
//!
//! The classifier does one longest-prefix lookup per address and reads a [`RuleSet`] from it,
//! so the set stored with a prefix must name every rule that lists that prefix *or any shorter
//! prefix containing it*: the longest match is the only one the kernel returns. (Any prefix
//! containing an address either contains the longest stored match or is contained by it, and
//! only the first kind can be listed, so that set is exactly the rules covering the address.)
//! This index keeps which rules list which prefix and says what to write when a rule comes or
//! goes: the prefixes it lists and every stored prefix below them.
use crate::spec::Cidr;
use chaos_abi::RuleSet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// A prefix with its host bits cleared, ordered by family, address, then length, so the
/// prefixes inside another one are one range of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub v6: bool,
    /// The address as a number (IPv4 in the low 32 bits).
    pub addr: u128,
    pub len: u8,
}

impl Prefix {
    pub fn of(cidr: &Cidr) -> Self {
        let (v6, addr, bits) = match cidr.addr {
            IpAddr::V4(a) => (false, u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (true, u128::from(a), 128),
        };
        let len = cidr.prefix.min(bits);
        Prefix {
            v6,
            addr: addr & mask(bits, len),
            len,
        }
    }

    fn bits(self) -> u8 {
        if self.v6 { 128 } else { 32 }
    }

    /// The shorter prefix of length `len` that contains this one.
    fn truncated(self, len: u8) -> Prefix {
        Prefix {
            len,
            addr: self.addr & mask(self.bits(), len),
            ..self
        }
    }

    /// The last address inside the prefix.
    fn last(self) -> u128 {
        let bits = self.bits();
        self.addr | (mask(bits, bits) & !mask(bits, self.len))
    }

    /// The address bytes as the trie's key wants them (network order).
    pub fn octets(self) -> Vec<u8> {
        if self.v6 {
            self.addr.to_be_bytes().to_vec()
        } else {
            (self.addr as u32).to_be_bytes().to_vec()
        }
    }
}

/// The mask of the first `len` of `bits` address bits, within the low `bits` bits.
fn mask(bits: u8, len: u8) -> u128 {
    let all: u128 = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    if len == 0 {
        0
    } else {
        all & !all.checked_shr(u32::from(len.min(bits))).unwrap_or(0)
    }
}

/// What to do to the trie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrieUpdate {
    Set(Prefix, RuleSet),
    Remove(Prefix),
}

/// Which rules list which prefixes, for one trie pair (remote or local).
#[derive(Debug, Default)]
pub struct CidrIndex {
    listed: BTreeMap<Prefix, BTreeSet<u32>>,
    /// How many listed prefixes there are of each (family, length): the only lengths at which
    /// a prefix can have a listed ancestor.
    lengths: BTreeMap<(bool, u8), usize>,
}

impl CidrIndex {
    /// Rule `slot` lists `cidrs`: the writes that make the trie say so.
    pub fn add(&mut self, slot: u32, cidrs: &[Cidr]) -> Vec<TrieUpdate> {
        let roots: BTreeSet<Prefix> = cidrs.iter().map(Prefix::of).collect();
        for p in &roots {
            let rules = self.listed.entry(*p).or_default();
            if rules.is_empty() {
                *self.lengths.entry((p.v6, p.len)).or_default() += 1;
            }
            rules.insert(slot);
        }
        self.rewrite_below(&roots)
    }

    /// Rule `slot` no longer lists `cidrs`.
    pub fn remove(&mut self, slot: u32, cidrs: &[Cidr]) -> Vec<TrieUpdate> {
        let roots: BTreeSet<Prefix> = cidrs.iter().map(Prefix::of).collect();
        let mut updates = Vec::new();
        for p in &roots {
            let Some(rules) = self.listed.get_mut(p) else {
                continue;
            };
            rules.remove(&slot);
            if rules.is_empty() {
                self.listed.remove(p);
                if let Some(n) = self.lengths.get_mut(&(p.v6, p.len)) {
                    *n -= 1;
                    if *n == 0 {
                        self.lengths.remove(&(p.v6, p.len));
                    }
                }
                updates.push(TrieUpdate::Remove(*p));
            }
        }
        updates.extend(self.rewrite_below(&roots));
        updates
    }

    pub fn len(&self) -> usize {
        self.listed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// The set every listed prefix inside one of `roots` (themselves included) must carry.
    fn rewrite_below(&self, roots: &BTreeSet<Prefix>) -> Vec<TrieUpdate> {
        let mut below = BTreeSet::new();
        for root in roots {
            let from = Prefix { len: 0, ..*root };
            let to = Prefix {
                addr: root.last(),
                len: u8::MAX,
                ..*root
            };
            below.extend(
                self.listed
                    .range(from..=to)
                    .map(|(p, _)| *p)
                    .filter(|p| p.len >= root.len),
            );
        }
        below
            .into_iter()
            .map(|p| TrieUpdate::Set(p, self.covering(p)))
            .collect()
    }

    /// Every rule listing `p` or a shorter prefix containing it.
    fn covering(&self, p: Prefix) -> RuleSet {
        let mut set = RuleSet::empty();
        let lengths = self
            .lengths
            .range((p.v6, 0)..=(p.v6, p.len))
            .map(|((_, len), _)| *len);
        for len in lengths {
            if let Some(rules) = self.listed.get(&p.truncated(len)) {
                for slot in rules {
                    set.insert(*slot);
                }
            }
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    /// What a longest-prefix lookup of `addr` would return after `updates`, replayed on a map.
    fn lookup(trie: &BTreeMap<Prefix, RuleSet>, addr: &str) -> Vec<u32> {
        let p = Prefix::of(&cidr(addr));
        (0..=p.bits())
            .rev()
            .find_map(|len| trie.get(&p.truncated(len)))
            .map(|s| (0..64).filter(|i| s.contains(*i)).collect())
            .unwrap_or_default()
    }

    fn replay(trie: &mut BTreeMap<Prefix, RuleSet>, updates: Vec<TrieUpdate>) {
        for u in updates {
            match u {
                TrieUpdate::Set(p, s) => {
                    trie.insert(p, s);
                }
                TrieUpdate::Remove(p) => {
                    trie.remove(&p);
                }
            }
        }
    }

    #[test]
    fn the_longest_match_names_every_covering_rule() {
        let (mut idx, mut trie) = (CidrIndex::default(), BTreeMap::new());
        replay(&mut trie, idx.add(1, &[cidr("10.0.0.0/8")]));
        replay(
            &mut trie,
            idx.add(2, &[cidr("10.1.0.0/16"), cidr("fd00::/64")]),
        );
        replay(&mut trie, idx.add(3, &[cidr("10.1.2.3")]));
        assert_eq!(lookup(&trie, "10.1.2.3"), vec![1, 2, 3]);
        assert_eq!(lookup(&trie, "10.1.9.9"), vec![1, 2]);
        assert_eq!(lookup(&trie, "10.9.9.9"), vec![1]);
        assert_eq!(lookup(&trie, "11.0.0.1"), Vec::<u32>::new());
        assert_eq!(lookup(&trie, "fd00::5"), vec![2]);
        // A rule added after a longer prefix exists reaches it too.
        replay(&mut trie, idx.add(4, &[cidr("10.0.0.0/7")]));
        assert_eq!(lookup(&trie, "10.1.2.3"), vec![1, 2, 3, 4]);
        assert_eq!(lookup(&trie, "11.0.0.1"), vec![4]);
        // Removing a rule takes it out below its prefixes and drops prefixes nobody lists.
        replay(
            &mut trie,
            idx.remove(2, &[cidr("10.1.0.0/16"), cidr("fd00::/64")]),
        );
        assert_eq!(lookup(&trie, "10.1.2.3"), vec![1, 3, 4]);
        assert_eq!(lookup(&trie, "10.1.9.9"), vec![1, 4]);
        assert_eq!(lookup(&trie, "fd00::5"), Vec::<u32>::new());
        for (slot, cidrs) in [
            (1, vec![cidr("10.0.0.0/8")]),
            (3, vec![cidr("10.1.2.3")]),
            (4, vec![cidr("10.0.0.0/7")]),
        ] {
            replay(&mut trie, idx.remove(slot, &cidrs));
        }
        assert!(idx.is_empty() && trie.is_empty(), "{trie:?}");
    }

    #[test]
    fn two_rules_listing_one_prefix_share_it() {
        let (mut idx, mut trie) = (CidrIndex::default(), BTreeMap::new());
        replay(&mut trie, idx.add(5, &[cidr("192.0.2.0/24")]));
        replay(&mut trie, idx.add(6, &[cidr("192.0.2.0/24")]));
        assert_eq!(lookup(&trie, "192.0.2.7"), vec![5, 6]);
        replay(&mut trie, idx.remove(5, &[cidr("192.0.2.0/24")]));
        assert_eq!(lookup(&trie, "192.0.2.7"), vec![6]);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn prefixes_ignore_host_bits_and_bound_their_range() {
        let p = Prefix::of(&Cidr {
            addr: "10.1.2.3".parse().expect("addr"),
            prefix: 16,
        });
        assert_eq!((p.addr, p.len), (0x0A01_0000, 16));
        assert_eq!(p.last(), 0x0A01_FFFF);
        assert_eq!(Prefix::of(&cidr("0.0.0.0/0")).last(), 0xFFFF_FFFF);
        assert_eq!(Prefix::of(&cidr("::/0")).last(), u128::MAX);
        assert_eq!(
            Prefix::of(&cidr("fd00::1")).last(),
            Prefix::of(&cidr("fd00::1")).addr
        );
    }
}
