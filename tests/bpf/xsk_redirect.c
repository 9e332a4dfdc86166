/* Test-only XDP program (bcc): redirect UDP to port XSK_PORT into
 * xsks_map[rx_queue_index]; pass everything else.  IPv4 (any IHL) and IPv6
 * (no extension headers).  If the queue has no socket in the map the packet
 * is passed (bpf_redirect_map's fallback action in the low flag bits).
 *
 * counters[0] = redirected, [1] = passed.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#ifndef XSK_PORT
#define XSK_PORT 40000
#endif

BPF_XSKMAP(xsks_map, 64);
BPF_PERCPU_ARRAY(counters, u64, 2);

static __always_inline int count(int idx, int verdict)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        *c += 1;
    return verdict;
}

int xsk_redirect(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct udphdr *udp;

    if ((void *)(eth + 1) > data_end)
        return count(1, XDP_PASS);
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
            return count(1, XDP_PASS);
        if (ip->frag_off & htons(0x3fff))  /* fragment: not ours */
            return count(1, XDP_PASS);
        udp = (void *)ip + ip->ihl * 4;
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_UDP)
            return count(1, XDP_PASS);
        udp = (void *)(ip6 + 1);
    } else {
        return count(1, XDP_PASS);
    }
    if ((void *)(udp + 1) > data_end || udp->dest != htons(XSK_PORT))
        return count(1, XDP_PASS);
    count(0, 0);
    return xsks_map.redirect_map(ctx->rx_queue_index, XDP_PASS);
}
