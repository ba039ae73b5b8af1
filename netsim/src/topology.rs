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

    /// The graph re6st's tunnel manager converges to, without simulating
    /// it: every node, in random order, opens `client_count` tunnels to
    /// distinct random peers that still accept incoming ones (at most
    /// `max_clients` each) and are not yet linked to it. Cheap enough for
    /// 100,000 nodes; `netsim::mesh` runs the real manager.
    pub fn re6st(n: usize, client_count: usize, max_clients: usize, rng: &mut Rng) -> Self {
        let mut incoming = vec![0usize; n];
        let mut linked: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut edges = Vec::new();
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for &a in &order {
            let mut opened = 0;
            let mut tries = 0;
            while opened < client_count.min(n - 1) && tries < 50 * n.max(1) {
                tries += 1;
                let b = rng.below(n);
                if b == a || incoming[b] >= max_clients || linked[a].contains(&b) {
                    continue;
                }
                incoming[b] += 1;
                linked[a].push(b);
                linked[b].push(a);
                edges.push((a.min(b), a.max(b)));
                opened += 1;
            }
        }
        Graph { nodes: n, edges }
    }

    /// Mean and largest shortest-path hop count between connected nodes,
    /// by breadth-first search from up to `sources` nodes.
    pub fn hop_counts(&self, sources: usize) -> (f64, usize) {
        let mut adj = vec![Vec::new(); self.nodes];
        for &(a, b) in &self.edges {
            adj[a].push(b);
            adj[b].push(a);
        }
        let (mut sum, mut cnt, mut max) = (0usize, 0usize, 0usize);
        let step = (self.nodes / sources.max(1)).max(1);
        for s in (0..self.nodes).step_by(step).take(sources) {
            let mut dist = vec![usize::MAX; self.nodes];
            dist[s] = 0;
            let mut q = std::collections::VecDeque::from([s]);
            while let Some(u) = q.pop_front() {
                for &v in &adj[u] {
                    if dist[v] == usize::MAX {
                        dist[v] = dist[u] + 1;
                        sum += dist[v];
                        cnt += 1;
                        max = max.max(dist[v]);
                        q.push_back(v);
                    }
                }
            }
        }
        (if cnt == 0 { 0.0 } else { sum as f64 / cnt as f64 }, max)
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

    #[test]
    fn re6st_graph_respects_the_manager_bounds_and_is_shallow() {
        let g = Graph::re6st(400, 10, 20, &mut Rng::new(1));
        assert_eq!(g.edges.len(), 4000, "every node opens its 10 tunnels");
        let mut deg = vec![0; 400];
        for &(a, b) in &g.edges {
            assert_ne!(a, b);
            deg[a] += 1;
            deg[b] += 1;
        }
        assert!(deg.iter().all(|&d| (10..=30).contains(&d)));
        let (mean, max) = g.hop_counts(50);
        assert!((1.5..3.0).contains(&mean), "mean hops {mean}");
        assert!(max <= 5);
        assert_eq!(Graph::chain(3).hop_counts(3), (4.0 / 3.0, 2));
    }
}
