// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Pinion's eBPF capture: outbound connects of meshed pods go to their in-pod 15001
 * listener, and the proxy learns where they were going through SO_ORIGINAL_DST.
 *
 * Only the stable context of each program type is read (struct bpf_sock_addr,
 * bpf_sock_ops, bpf_sockopt from the uapi linux/bpf.h): no kernel BTF, no CO-RE,
 * no kernel headers, so the object loads on Raspberry Pi OS kernels as built here.
 * Kernel >= 5.15 (bpf_get_netns_cookie in sockops). See bpf/README.md.
 *
 * Everything per pod is keyed by the pod's network-namespace cookie: a pod is one
 * netns, its processes may sit in any cgroup below the pod cgroup, and a socket's
 * netns is known to every hook (including the agent's accepted socket).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define DNS_PORT 53
#define LOOPBACK_NET 0x7f000000 /* 127.0.0.0/8, host order */

/* skip_cidrs values: an excluded CIDR (counted here) or one of the pod's own addresses
 * (traffic that stays in the pod, as loopback: neither captured nor counted). */
#define SKIP_EXCLUDED 1
#define SKIP_LOCAL 2

/* What connect4/6 decided for a socket, carried from connect to close. */
#define KIND_REDIRECTED 1 /* sent to the proxy: the proxy counts it */
#define KIND_ACCOUNTED 2  /* excluded port/CIDR: counted here, in the kernel */

struct pod_config {
	__u32 proxy_mark;    /* sockets carrying it are the proxy's own: never captured */
	__u16 outbound_port; /* host order: the in-pod listener on 127.0.0.1 */
	__u16 flags;         /* reserved */
};

struct port_key {
	__u64 netns_cookie;
	__u32 port; /* host order */
	__u32 pad;
};

/* LPM key: the cookie is matched in full (64 bits), then `prefixlen - 64` bits of addr. */
struct cidr_key {
	__u32 prefixlen;
	__u64 netns_cookie;
	__u32 addr; /* network order */
} __attribute__((packed));

struct connection {
	__u32 addr;  /* original destination, network order */
	__u16 port;  /* original destination port, network order */
	__u8 kind;   /* KIND_* */
	__u8 established;
};

struct tcp_stats {
	__u64 opened;
	__u64 closed;
	__u64 read_bytes;
	__u64 write_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64); /* netns cookie */
	__type(value, struct pod_config);
} pod_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct port_key);
	__type(value, __u8);
} skip_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct cidr_key);
	__type(value, __u8);
} skip_cidrs SEC(".maps");

/* connect4 -> sockops: the local port is not chosen yet at connect time. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct connection);
} by_cookie SEC(".maps");

/* sockops -> getsockopt: the client's (netns, local port) = the accepted socket's peer. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, struct connection);
} by_port SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64); /* netns cookie */
	__type(value, struct tcp_stats);
} stats SEC(".maps");

/* Skip the connection? (proxy mark, loopback, DNS, excluded ports and CIDRs) */
static __always_inline int skipped(struct pod_config *config, __u32 mark, __u32 addr,
				   __u16 port_host)
{
	__u32 host_addr = bpf_ntohl(addr);

	if (mark == config->proxy_mark)
		return 1;
	if ((host_addr & 0xff000000) == LOOPBACK_NET || host_addr == 0)
		return 1;
	if (port_host == DNS_PORT)
		return 1;
	return 0;
}

/* 0: capture; SKIP_EXCLUDED: leave alone but count; SKIP_LOCAL: leave alone. */
static __always_inline int excluded(__u64 netns, __u32 addr, __u16 port_host)
{
	struct port_key port = { .netns_cookie = netns, .port = port_host };
	struct cidr_key cidr = { .prefixlen = 96, .netns_cookie = netns, .addr = addr };
	__u8 *skip = bpf_map_lookup_elem(&skip_cidrs, &cidr);

	if (skip)
		return *skip;
	return bpf_map_lookup_elem(&skip_ports, &port) ? SKIP_EXCLUDED : 0;
}

/* Shared by connect4 and connect6 (v4-mapped): returns the loopback address to use, or 0. */
static __always_inline int capture(struct bpf_sock_addr *ctx, __u32 addr, __u16 *new_port)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct pod_config *config = bpf_map_lookup_elem(&pod_config, &netns);
	struct bpf_sock *sk = ctx->sk;
	__u16 port_host = bpf_ntohs((__u16)ctx->user_port);
	struct connection connection = { .addr = addr, .port = (__u16)ctx->user_port };
	__u64 cookie;
	int skip;

	if (!config || !sk || ctx->type != SOCK_STREAM)
		return 0;
	if (skipped(config, sk->mark, addr, port_host))
		return 0;
	cookie = bpf_get_socket_cookie(ctx);
	skip = excluded(netns, addr, port_host);
	if (skip == SKIP_LOCAL)
		return 0;
	if (skip) {
		connection.kind = KIND_ACCOUNTED;
		bpf_map_update_elem(&by_cookie, &cookie, &connection, BPF_ANY);
		return 0;
	}
	connection.kind = KIND_REDIRECTED;
	if (bpf_map_update_elem(&by_cookie, &cookie, &connection, BPF_ANY))
		return 0; /* cannot remember where it was going: leave it alone */
	*new_port = bpf_htons(config->outbound_port);
	return 1;
}

SEC("cgroup/connect4")
int pinion_connect4(struct bpf_sock_addr *ctx)
{
	__u16 port = 0;

	if (capture(ctx, ctx->user_ip4, &port)) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = port;
	}
	return 1;
}

/* IPv6 is not captured (as in netfilter mode, whose tables are `ip` only); dual-stack
 * sockets connecting to IPv4-mapped addresses are IPv4 on the wire and are. */
SEC("cgroup/connect6")
int pinion_connect6(struct bpf_sock_addr *ctx)
{
	__u16 port = 0;

	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
	    ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
		return 1;
	if (capture(ctx, ctx->user_ip6[3], &port)) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
		ctx->user_port = port;
	}
	return 1;
}

static __always_inline void count_close(__u64 netns, struct bpf_sock_ops *ctx)
{
	struct tcp_stats *counters = bpf_map_lookup_elem(&stats, &netns);

	if (!counters)
		return;
	__sync_fetch_and_add(&counters->closed, 1);
	__sync_fetch_and_add(&counters->read_bytes, ctx->bytes_received);
	__sync_fetch_and_add(&counters->write_bytes, ctx->bytes_acked > 0 ? ctx->bytes_acked - 1 : 0);
}

SEC("sockops")
int pinion_sockops(struct bpf_sock_ops *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct port_key key = { .netns_cookie = netns, .port = ctx->local_port };
	struct connection *connection;
	struct tcp_stats *counters;
	__u64 cookie;

	switch (ctx->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: /* local port chosen, SYN not sent yet */
		cookie = bpf_get_socket_cookie(ctx);
		connection = bpf_map_lookup_elem(&by_cookie, &cookie);
		if (!connection)
			return 1;
		bpf_map_update_elem(&by_port, &key, connection, BPF_ANY);
		bpf_map_delete_elem(&by_cookie, &cookie);
		bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		connection = bpf_map_lookup_elem(&by_port, &key);
		if (!connection || connection->kind != KIND_ACCOUNTED)
			return 1;
		connection->established = 1;
		counters = bpf_map_lookup_elem(&stats, &netns);
		if (counters)
			__sync_fetch_and_add(&counters->opened, 1);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (ctx->args[1] != BPF_TCP_CLOSE)
			return 1;
		connection = bpf_map_lookup_elem(&by_port, &key);
		if (!connection)
			return 1;
		if (connection->kind == KIND_ACCOUNTED && connection->established)
			count_close(netns, ctx);
		bpf_map_delete_elem(&by_port, &key);
		return 1;
	}
	return 1;
}

/* On the agent's cgroup: answer SO_ORIGINAL_DST for a connection accepted on a pod's
 * 15001 listener. No NAT happened, so conntrack has nothing to say: it fails (ENOENT) or,
 * when the netns tracks connections for the inbound rules, names the listener itself.
 * Our answer replaces either. */
SEC("cgroup/getsockopt")
int pinion_getsockopt(struct bpf_sockopt *ctx)
{
	struct sockaddr_in_raw {
		__u16 family;
		__u16 port;
		__u32 addr;
		__u8 zero[8];
	} *answer = ctx->optval;
	struct bpf_sock *sk = ctx->sk;
	struct port_key key = {};
	struct connection *connection;
	struct pod_config *config;
	__u64 netns;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (!sk || sk->family != AF_INET)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	config = bpf_map_lookup_elem(&pod_config, &netns);
	if (!config || sk->src_port != config->outbound_port)
		return 1; /* not accepted on a pod's outbound listener */
	key.netns_cookie = netns;
	key.port = bpf_ntohs(sk->dst_port);
	connection = bpf_map_lookup_elem(&by_port, &key);
	if (!connection || connection->kind != KIND_REDIRECTED)
		return 1;
	if ((void *)(answer + 1) > ctx->optval_end)
		return 1; /* the caller's buffer is too small: keep the kernel's answer */
	answer->family = AF_INET;
	answer->port = connection->port;
	answer->addr = connection->addr;
	__builtin_memset(answer->zero, 0, sizeof(answer->zero));
	ctx->optlen = sizeof(*answer);
	asm volatile("" ::: "memory"); /* two 32-bit context stores, never one 64-bit store */
	ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
