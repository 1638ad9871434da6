/*
 * LD_PRELOAD shim for the end-to-end tests: keep a server on the loopback interface.
 *
 * xrootd 5.5 has no listen-address directive and binds the wildcard address. This shim
 * wraps bind(2): a wildcard IPv4 bind becomes 127.0.0.1, a wildcard IPv6 bind becomes
 * ::ffff:127.0.0.1 (dual-stack socket) or ::1 (IPV6_V6ONLY socket), loopback binds pass
 * unchanged, and every other IPv4/IPv6 address is refused with EACCES. Other address
 * families (unix sockets) pass unchanged.
 *
 * It must NOT do anything else: no logging to the served process's output, no other
 * interposed calls. Compiled at test time by tests/e2e/_xrootd.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int is_v6_loopback(const struct in6_addr *a)
{
    if (IN6_IS_ADDR_LOOPBACK(a))
        return 1;
    if (IN6_IS_ADDR_V4MAPPED(a))
        return a->s6_addr[12] == 127;
    return 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) {
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
        if (real_bind == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (addr == NULL)
        return real_bind(fd, addr, len);

    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in sin;
        memcpy(&sin, addr, sizeof(sin));
        if (sin.sin_addr.s_addr == htonl(INADDR_ANY)) {
            sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&sin, sizeof(sin));
        }
        if ((ntohl(sin.sin_addr.s_addr) >> 24) == 127)
            return real_bind(fd, addr, len);
        errno = EACCES;
        return -1;
    }

    if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 sin6;
        memcpy(&sin6, addr, sizeof(sin6));
        if (IN6_IS_ADDR_UNSPECIFIED(&sin6.sin6_addr)) {
            int v6only = 0;
            socklen_t optlen = sizeof(v6only);
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) != 0)
                v6only = 1;
            if (v6only) {
                sin6.sin6_addr = in6addr_loopback;
            } else {
                memset(&sin6.sin6_addr, 0, sizeof(sin6.sin6_addr));
                sin6.sin6_addr.s6_addr[10] = 0xff;
                sin6.sin6_addr.s6_addr[11] = 0xff;
                sin6.sin6_addr.s6_addr[12] = 127;
                sin6.sin6_addr.s6_addr[15] = 1;
            }
            return real_bind(fd, (const struct sockaddr *)&sin6, sizeof(sin6));
        }
        if (is_v6_loopback(&sin6.sin6_addr))
            return real_bind(fd, addr, len);
        errno = EACCES;
        return -1;
    }

    return real_bind(fd, addr, len);
}
