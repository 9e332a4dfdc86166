// SPDX-License-Identifier: MIT
/*
 * wgx_xdp.c -- XDP classifier for WireGuard v1 UDP on the underlay NIC.
 *
 * Compiled at run time by bcc (wgx/dataplane/xdp.py).  Every packet gets
 * exactly one verdict, counted in `verdicts`:
 *
 *   not IPv4/IPv6+UDP to our port, or an IPv4 fragment  -> XDP_PASS (untouched)
 *   handshake initiation/response/cookie, exact size     -> XDP_PASS (daemon socket)
 *     (initiations under load: per-source token bucket; then, unless the
 *      source is a known peer endpoint, a global one; excess -> XDP_DROP)
 *   transport data, known receiver index, counter >= floor
 *                                 -> XDP_REDIRECT to xsks[rx_queue_index],
 *                                    XDP_PASS if no AF_XDP socket on that queue
 *   anything else on our port (malformed, nonzero reserved bytes, unknown
 *   type, wrong size, unknown index, counter below the floor) -> XDP_DROP
 *
 * Only one VLAN tag and the IPv6 fixed header are parsed: QinQ and IPv6
 * extension headers are "not ours" and reach the daemon's socket unfiltered.
 *
 * Run-time settings (listen port, under-load flag, rate limit) live in the
 * `config` array so they change without recompiling.  Map sizes are -D
 * overridable.  All multi-byte map fields are host byte order, except the
 * sessions key, which is the receiver index's 4 wire bytes (little endian).
 *
 * Keep `enum wgx_verdict` in sync with VERDICT_NAMES in wgx/dataplane/xdp.py
 * (tests/test_xdp.py checks it): WGX_V_FOO here is "foo" there.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#ifndef WGX_SESSIONS_MAX
#define WGX_SESSIONS_MAX 65536
#endif
#ifndef WGX_XSKS_MAX
#define WGX_XSKS_MAX 64
#endif
#ifndef WGX_RATELIMIT_MAX
#define WGX_RATELIMIT_MAX 16384
#endif
#ifndef WGX_KNOWN_MAX
#define WGX_KNOWN_MAX 4096
#endif

#define WG_TYPE_INITIATION 1
#define WG_TYPE_RESPONSE 2
#define WG_TYPE_COOKIE 3
#define WG_TYPE_DATA 4
#define WG_SIZE_INITIATION 148
#define WG_SIZE_RESPONSE 92
#define WG_SIZE_COOKIE 64
#define WG_SIZE_DATA_HEADER 16 /* type+reserved, receiver index, counter */
#define WG_SIZE_DATA_MIN 32    /* header + Poly1305 tag (keepalive) */

#define WGX_IP_MF 0x2000
#define WGX_IP_OFFSET 0x1fff
#define WGX_ETH_P_8021Q 0x8100
#define WGX_ETH_P_8021AD 0x88a8

#define WGX_CFG_UNDER_LOAD 1

enum wgx_verdict {
	WGX_V_PASS_NOT_OURS = 0,   /* not IP/UDP, other port, truncated headers */
	WGX_V_PASS_FRAGMENT,       /* IPv4 fragment (MF set or offset != 0) */
	WGX_V_PASS_INITIATION,     /* type 1, 148 B */
	WGX_V_PASS_RESPONSE,       /* type 2, 92 B */
	WGX_V_PASS_COOKIE,         /* type 3, 64 B */
	WGX_V_REDIRECT_DATA,       /* type 4 -> AF_XDP socket */
	WGX_V_PASS_DATA_NO_XSK,    /* type 4 valid, but no XSK on this rx queue */
	WGX_V_DROP_MALFORMED,      /* UDP length < 12 or beyond the frame */
	WGX_V_DROP_RESERVED,       /* reserved bytes 1..3 not zero */
	WGX_V_DROP_BAD_TYPE,       /* type not 1..4 */
	WGX_V_DROP_BAD_SIZE,       /* known type, wrong length */
	WGX_V_DROP_UNKNOWN_INDEX,  /* type 4, receiver index not in sessions */
	WGX_V_DROP_STALE_COUNTER,  /* type 4, counter below the session's floor */
	WGX_V_DROP_RATELIMIT,      /* type 1 under load, source over its rate */
	WGX_V_DROP_RATELIMIT_GLOBAL, /* type 1 under load, unknown source, global rate spent */
	WGX_V__COUNT,
};

struct wgx_config {
	__u16 listen_port; /* host order; 0 = disarmed: everything is "not ours" */
	__u16 pad;
	__u32 flags;       /* WGX_CFG_UNDER_LOAD */
	__u64 rl_cost_ns;  /* token cost of one initiation (1e9 / rate) */
	__u64 rl_max_ns;   /* bucket depth (cost * burst) */
	__u64 gl_cost_ns;  /* global bucket (per CPU): cost of one initiation; 0 = off */
	__u64 gl_max_ns;   /* global bucket depth */
};

struct wgx_session {
	__u64 floor;   /* counters below this are dropped (max accepted - window) */
	__u32 peer_id; /* opaque to XDP, for userspace */
	__u32 flags;   /* reserved, 0 */
};

struct wgx_rl_key {
	__u32 family;  /* 4 or 6 */
	__u32 addr[2]; /* IPv4 source in addr[0]; IPv6 source /64 */
};

struct wgx_rl_state {
	__u64 last_ns;
	__u64 tokens; /* in ns of credit, at most rl_max_ns */
};

struct wgx_counter {
	__u64 packets;
	__u64 bytes;
};

struct wgx_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

BPF_ARRAY(config, struct wgx_config, 1);
BPF_HASH(sessions, __u32, struct wgx_session, WGX_SESSIONS_MAX);
BPF_XSKMAP(xsks, WGX_XSKS_MAX);
BPF_TABLE("lru_hash", struct wgx_rl_key, struct wgx_rl_state, ratelimit, WGX_RATELIMIT_MAX);
BPF_PERCPU_ARRAY(verdicts, struct wgx_counter, WGX_V__COUNT);
/* Sources (same key as ratelimit) of configured peers' endpoints: under load
 * they skip the global bucket, so a spoofed flood cannot crowd them out. */
BPF_HASH(known, struct wgx_rl_key, __u32, WGX_KNOWN_MAX);
BPF_PERCPU_ARRAY(global_rl, struct wgx_rl_state, 1);

static __always_inline int count(struct xdp_md *ctx, __u32 verdict, int action)
{
	struct wgx_counter *c = verdicts.lookup(&verdict);

	if (c) {
		c->packets += 1;
		c->bytes += ctx->data_end - ctx->data;
	}
	return action;
}

/* Kernel-ratelimiter-style token bucket; racy across CPUs by design (an
 * occasional extra packet is harmless, a lock per initiation is not). */
static __always_inline int ratelimit_allow(struct wgx_rl_key *key, struct wgx_config *cfg)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 cost = cfg->rl_cost_ns;
	__u64 max = cfg->rl_max_ns;
	struct wgx_rl_state *st;
	__u64 tokens;

	if (cost == 0)
		return 1;
	if (max < cost)
		max = cost;
	st = ratelimit.lookup(key);
	if (!st) {
		struct wgx_rl_state fresh = { .last_ns = now, .tokens = max - cost };

		ratelimit.update(key, &fresh);
		return 1;
	}
	tokens = st->tokens + (now - st->last_ns);
	if (tokens > max)
		tokens = max;
	st->last_ns = now;
	if (tokens >= cost) {
		st->tokens = tokens - cost;
		return 1;
	}
	st->tokens = tokens;
	return 0;
}

/* Global initiation budget for unknown sources under load: one bucket per CPU
 * (no atomics), so the total is about ncpus * 1e9 / gl_cost_ns per second. */
static __always_inline int global_allow(struct wgx_config *cfg)
{
	__u32 zero = 0;
	struct wgx_rl_state *st = global_rl.lookup(&zero);
	__u64 now, tokens;

	if (cfg->gl_cost_ns == 0 || !st)
		return 1;
	now = bpf_ktime_get_ns();
	tokens = st->tokens + (now - st->last_ns);
	if (tokens > cfg->gl_max_ns)
		tokens = cfg->gl_max_ns;
	st->last_ns = now;
	if (tokens >= cfg->gl_cost_ns) {
		st->tokens = tokens - cfg->gl_cost_ns;
		return 1;
	}
	st->tokens = tokens;
	return 0;
}

int wgx_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct wgx_rl_key src = {};
	struct wgx_config *cfg;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u32 zero = 0;
	__u16 proto;
	void *l3;

	cfg = config.lookup(&zero);
	if (!cfg || cfg->listen_port == 0)
		return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);

	/* Ethernet, at most one 802.1Q / 802.1ad tag */
	if ((void *)(eth + 1) > data_end)
		return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
	proto = eth->h_proto;
	l3 = eth + 1;
	if (proto == htons(WGX_ETH_P_8021Q) || proto == htons(WGX_ETH_P_8021AD)) {
		struct wgx_vlan_hdr *vh = l3;

		if ((void *)(vh + 1) > data_end)
			return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
		proto = vh->proto;
		l3 = vh + 1;
	}

	/* IPv4 (any IHL, no fragments) or IPv6 (fixed header, next header UDP) */
	if (proto == htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
		ihl = ip->ihl;
		if (ip->version != 4 || ihl < 5)
			return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
		if (ip->frag_off & htons(WGX_IP_MF | WGX_IP_OFFSET))
			return count(ctx, WGX_V_PASS_FRAGMENT, XDP_PASS);
		if (ip->protocol != IPPROTO_UDP)
			return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
		udp = l3 + ihl * 4;
		src.family = 4;
		src.addr[0] = ip->saddr;
	} else if (proto == htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > data_end)
			return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
		if (ip6->nexthdr != IPPROTO_UDP)
			return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
		udp = (void *)(ip6 + 1);
		src.family = 6;
		src.addr[0] = ip6->saddr.in6_u.u6_addr32[0];
		src.addr[1] = ip6->saddr.in6_u.u6_addr32[1];
	} else {
		return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
	}

	/* UDP to our port */
	if ((void *)(udp + 1) > data_end)
		return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);
	if (udp->dest != htons(cfg->listen_port))
		return count(ctx, WGX_V_PASS_NOT_OURS, XDP_PASS);

	/* From here on the packet is ours: pass, redirect or drop. */
	__u32 ulen = ntohs(udp->len);
	__u8 *msg = (__u8 *)(udp + 1);

	if (ulen < sizeof(*udp) + 4 || (void *)udp + ulen > data_end)
		return count(ctx, WGX_V_DROP_MALFORMED, XDP_DROP);
	if ((void *)(msg + 4) > data_end)
		return count(ctx, WGX_V_DROP_MALFORMED, XDP_DROP);
	if (msg[1] | msg[2] | msg[3])
		return count(ctx, WGX_V_DROP_RESERVED, XDP_DROP);

	__u32 len = ulen - sizeof(*udp);

	switch (msg[0]) {
	case WG_TYPE_INITIATION:
		if (len != WG_SIZE_INITIATION)
			return count(ctx, WGX_V_DROP_BAD_SIZE, XDP_DROP);
		if (cfg->flags & WGX_CFG_UNDER_LOAD) {
			if (!ratelimit_allow(&src, cfg))
				return count(ctx, WGX_V_DROP_RATELIMIT, XDP_DROP);
			if (!known.lookup(&src) && !global_allow(cfg))
				return count(ctx, WGX_V_DROP_RATELIMIT_GLOBAL, XDP_DROP);
		}
		return count(ctx, WGX_V_PASS_INITIATION, XDP_PASS);
	case WG_TYPE_RESPONSE:
		if (len != WG_SIZE_RESPONSE)
			return count(ctx, WGX_V_DROP_BAD_SIZE, XDP_DROP);
		return count(ctx, WGX_V_PASS_RESPONSE, XDP_PASS);
	case WG_TYPE_COOKIE:
		if (len != WG_SIZE_COOKIE)
			return count(ctx, WGX_V_DROP_BAD_SIZE, XDP_DROP);
		return count(ctx, WGX_V_PASS_COOKIE, XDP_PASS);
	case WG_TYPE_DATA:
		break;
	default:
		return count(ctx, WGX_V_DROP_BAD_TYPE, XDP_DROP);
	}

	/* Transport data: header (16 B) + encrypted payload, at least the 16 B tag.
	 * No multiple-of-16 rule: senders pad to 16 only up to the tunnel MTU, so a
	 * full-size packet with an MTU like 1420 (not a multiple of 16) is not
	 * aligned. A wrong length fails authentication in the worker anyway. */
	if (len < WG_SIZE_DATA_MIN)
		return count(ctx, WGX_V_DROP_BAD_SIZE, XDP_DROP);
	if ((void *)(msg + WG_SIZE_DATA_HEADER) > data_end)
		return count(ctx, WGX_V_DROP_MALFORMED, XDP_DROP);

	/* Key = the 4 wire bytes of the receiver index (userspace packs "<I"). */
	__u32 index = *(__u32 *)(msg + 4);
	__u64 counter = *(__u64 *)(msg + 8);
	struct wgx_session *s = sessions.lookup(&index);

#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	counter = __builtin_bswap64(counter);
#endif
	if (!s)
		return count(ctx, WGX_V_DROP_UNKNOWN_INDEX, XDP_DROP);
	if (counter < s->floor)
		return count(ctx, WGX_V_DROP_STALE_COUNTER, XDP_DROP);

	/* No socket on this queue: bpf_redirect_map returns the flags (XDP_PASS)
	 * and the daemon's UDP socket gets the packet instead. */
	int action = xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);

	if (action == XDP_REDIRECT)
		return count(ctx, WGX_V_REDIRECT_DATA, XDP_REDIRECT);
	return count(ctx, WGX_V_PASS_DATA_NO_XSK, action);
}
