//! Port ranges as the policy trie holds them: aligned prefixes of the 16-bit port.

/// Splits `start..=end` into the fewest (port, prefix length) blocks that cover it exactly.
pub fn range_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (start as u32, end as u32);
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(blocks: &[(u16, u8)]) -> Vec<u32> {
        let mut ports: Vec<u32> = blocks
            .iter()
            .flat_map(|(p, len)| {
                let size = 1u32 << (16 - len);
                (*p as u32)..(*p as u32 + size)
            })
            .collect();
        ports.sort();
        ports
    }

    #[test]
    fn a_single_port_is_one_full_prefix() {
        assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
    }

    #[test]
    fn ranges_are_covered_exactly() {
        for (s, e) in [
            (32000, 32768),
            (1, 65535),
            (0, 65535),
            (8080, 8090),
            (65535, 65535),
        ] {
            let blocks = range_prefixes(s, e);
            assert_eq!(
                covered(&blocks),
                (s as u32..=e as u32).collect::<Vec<_>>(),
                "{s}-{e}"
            );
            assert!(blocks.len() <= 32);
        }
    }
}
