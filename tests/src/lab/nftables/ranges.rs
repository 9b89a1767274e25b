//! Range arithmetic on addresses (u128) and ports: an ipBlock less its excepts, and the
//! elements of one target and protocol made disjoint, which an interval set needs.

use super::Range;
use std::collections::BTreeMap;

/// `whole` less every range of `holes`, in order.
pub(super) fn minus(whole: Range, holes: &[Range]) -> Vec<Range> {
    let mut holes = holes.to_vec();
    holes.sort_unstable();
    let mut out = Vec::new();
    // The first address not yet placed or removed.
    let mut from = whole.0;
    for (s, e) in holes {
        if e < from || s > whole.1 {
            continue;
        }
        if s > from {
            out.push((from, s - 1));
        }
        match e.checked_add(1) {
            Some(next) if next <= whole.1 => from = next,
            // The hole reaches the end of `whole`.
            _ => return out,
        }
    }
    out.push((from, whole.1));
    out
}

/// `ranges` with the overlapping ones joined, sorted. Ranges that only touch stay
/// apart: each rule keeps its own element where nothing forces them together.
pub(super) fn union(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Rectangles (peers × ports) of one target and protocol made disjoint, covering the
/// same points, sorted. A rectangle that overlaps no other comes out as it went in, so
/// the element count follows the rules; each group of overlapping ones is cut
/// (`sweep`).
pub(super) fn disjoint(mut rects: Vec<(Range, Range)>) -> Vec<(Range, Range)> {
    rects.sort_unstable();
    rects.dedup();
    // The groups (union-find over overlapping pairs): sorted by peers, a rectangle
    // need only be compared with those whose peers reach its first one.
    let mut parent: Vec<usize> = (0..rects.len()).collect();
    let mut active: Vec<usize> = Vec::new();
    for i in 0..rects.len() {
        let (peers, ports) = rects[i];
        active.retain(|&j| rects[j].0 .1 >= peers.0);
        for &j in &active {
            let other = rects[j].1;
            if other.0 <= ports.1 && ports.0 <= other.1 {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a] = b;
            }
        }
        active.push(i);
    }
    let mut groups: BTreeMap<usize, Vec<(Range, Range)>> = BTreeMap::new();
    for (i, rect) in rects.iter().enumerate() {
        groups.entry(root(&mut parent, i)).or_default().push(*rect);
    }
    // Two groups share no point, nor do their pieces.
    let mut out: Vec<(Range, Range)> = groups
        .into_values()
        .flat_map(|g| if g.len() == 1 { g } else { sweep(&g) })
        .collect();
    out.sort_unstable();
    out
}

fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// A sweep over the peer axis cuts it where some rectangle starts or ends; on each
/// piece the ports are the union of the rectangles over it; neighbouring pieces with
/// the same ports join. `rects` sorted.
fn sweep(rects: &[(Range, Range)]) -> Vec<(Range, Range)> {
    // Where the rectangles over the peer axis can change: every start and end + 1.
    let mut cuts: Vec<u128> = rects
        .iter()
        .flat_map(|((s, e), _)| [Some(*s), e.checked_add(1)])
        .flatten()
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces: Vec<(Range, Vec<Range>)> = Vec::new();
    let mut active: Vec<usize> = Vec::new();
    let mut next = 0;
    for (i, &at) in cuts.iter().enumerate() {
        while next < rects.len() && rects[next].0 .0 <= at {
            active.push(next);
            next += 1;
        }
        active.retain(|&r| rects[r].0 .1 >= at);
        if active.is_empty() {
            continue;
        }
        // No rectangle starts or ends inside a piece: the next cut bounds it (none
        // after the last: a rectangle there ends at the top of the axis).
        let end = cuts.get(i + 1).map_or(u128::MAX, |c| c - 1);
        let ports = union(active.iter().map(|&r| rects[r].1).collect());
        match pieces.last_mut() {
            Some(((_, last_end), last_ports)) if *last_end + 1 == at && *last_ports == ports => {
                *last_end = end;
            }
            _ => pieces.push(((at, end), ports)),
        }
    }
    pieces
        .into_iter()
        .flat_map(|(peers, ports)| ports.into_iter().map(move |p| (peers, p)))
        .collect()
}
