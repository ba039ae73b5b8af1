//! Installs the routes Babel selected into the kernel with rtnetlink, as
//! protocol `babel` (42), including IPv6 source-specific routes
//! (`ip -6 route … from SRC`), and removes them on retraction and on exit.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::core::RouteKey;

/// Kernel route installation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("netlink: {0} (are we root, or do we have CAP_NET_ADMIN?)")]
    Netlink(#[from] rtnetlink::Error),
}

/// The kernel routes this router owns.
pub struct KernelRoutes {
    handle: Handle,
    installed: HashMap<RouteKey, (u32, Ipv6Addr)>,
}

fn message(key: &RouteKey, route: Option<(u32, Ipv6Addr)>) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(key.0.network(), key.0.prefix_len())
        .protocol(RouteProtocol::Babel);
    if let Some(src) = key.1 {
        b = b.source_prefix(src.network(), src.prefix_len());
    }
    if let Some((ifindex, via)) = route {
        b = b.gateway(via).output_interface(ifindex);
    }
    b.build()
}

impl KernelRoutes {
    /// Opens a netlink connection on the current tokio runtime.
    pub fn new() -> Result<Self, KernelError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(conn);
        Ok(KernelRoutes { handle, installed: HashMap::new() })
    }

    /// Installs or replaces the route for `key`.
    pub async fn install(&mut self, key: RouteKey, ifindex: u32, via: Ipv6Addr) -> Result<(), KernelError> {
        if self.installed.get(&key) == Some(&(ifindex, via)) {
            return Ok(());
        }
        self.handle.route().add(message(&key, Some((ifindex, via)))).replace().execute().await?;
        self.installed.insert(key, (ifindex, via));
        Ok(())
    }

    /// Removes the route for `key`, if we installed one.
    pub async fn remove(&mut self, key: &RouteKey) -> Result<(), KernelError> {
        if let Some(r) = self.installed.remove(key) {
            self.handle.route().del(message(key, Some(r))).execute().await?;
        }
        Ok(())
    }

    /// Removes every route we installed (clean exit).
    pub async fn remove_all(&mut self) {
        let keys: Vec<RouteKey> = self.installed.keys().copied().collect();
        for k in keys {
            if let Err(e) = self.remove(&k).await {
                tracing::warn!(prefix = %k.0, "could not remove kernel route: {e}");
            }
        }
    }

    /// Deletes `proto babel` routes through the given interfaces that an
    /// earlier run left behind (a crash), so they do not linger.
    pub async fn remove_stale(&self, ifindexes: &[u32]) -> Result<usize, KernelError> {
        let mut stale = Vec::new();
        let mut dump = self.handle.route().get(RouteMessageBuilder::<Ipv6Addr>::new().build()).execute();
        while let Some(r) = dump.try_next().await? {
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if r.header.protocol == RouteProtocol::Babel && oif.is_some_and(|i| ifindexes.contains(&i)) {
                stale.push(r);
            }
        }
        let n = stale.len();
        for r in stale {
            self.handle.route().del(r).execute().await?;
        }
        Ok(n)
    }
}
