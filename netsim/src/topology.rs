//! Graphs to simulate: chains, rings, grids (like meshnet-lab's "grid4"),
//! and connected random graphs.

use crate::rng::Rng;

/// An undirected graph as a list of edges between node indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    pub nodes: usize,
    pub edges: Vec<(usize, usize)>,
}

impl Graph {
    /// 0 - 1 - … - (n-1).
    pub fn chain(n: usize) -> Self {
        Graph { nodes: n, edges: (1..n).map(|i| (i - 1, i)).collect() }
    }

    /// A chain closed into a ring.
    pub fn ring(n: usize) -> Self {
        let mut g = Graph::chain(n);
        if n > 2 {
            g.edges.push((n - 1, 0));
        }
        g
    }

    /// A `w` × `h` grid: every node linked to at most 4 neighbours.
    pub fn grid(w: usize, h: usize) -> Self {
        let mut edges = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                if x + 1 < w {
                    edges.push((i, i + 1));
                }
                if y + 1 < h {
                    edges.push((i, i + w));
                }
            }
        }
        Graph { nodes: w * h, edges }
    }

    /// A random spanning tree (each node links to an earlier one) plus
    /// `extra` distinct random edges: always connected.
    pub fn random_connected(n: usize, extra: usize, rng: &mut Rng) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut edges = Vec::new();
        for i in 1..n {
            let j = rng.below(i);
            seen.insert((j, i));
            edges.push((j, i));
        }
        let max_extra = n * (n - 1) / 2 - (n - 1);
        let mut added = 0;
        while added < extra.min(max_extra) {
            let (a, b) = (rng.below(n), rng.below(n));
            if a != b && seen.insert((a.min(b), a.max(b))) {
                edges.push((a.min(b), a.max(b)));
                added += 1;
            }
        }
        Graph { nodes: n, edges }
    }

    /// Whether every node can reach every other one over edges for which
    /// `up` holds.
    pub fn connected_with(&self, up: impl Fn(usize) -> bool) -> bool {
        if self.nodes == 0 {
            return true;
        }
        let mut adj = vec![Vec::new(); self.nodes];
        for (i, &(a, b)) in self.edges.iter().enumerate() {
            if up(i) {
                adj[a].push(b);
                adj[b].push(a);
            }
        }
        let mut seen = vec![false; self.nodes];
        let mut stack = vec![0];
        seen[0] = true;
        while let Some(n) = stack.pop() {
            for &m in &adj[n] {
                if !seen[m] {
                    seen[m] = true;
                    stack.push(m);
                }
            }
        }
        seen.into_iter().all(|s| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(Graph::chain(4).edges, vec![(0, 1), (1, 2), (2, 3)]);
        assert_eq!(Graph::ring(4).edges.len(), 4);
        let g = Graph::grid(3, 2);
        assert_eq!(g.edges.len(), 7);
        assert!(g.connected_with(|_| true));
        assert!(!g.connected_with(|_| false));
        let g = Graph::random_connected(50, 20, &mut Rng::new(3));
        assert_eq!(g.edges.len(), 49 + 20);
        assert!(g.connected_with(|_| true));
    }
}
