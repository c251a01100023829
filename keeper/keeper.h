/* pinion-keeper's store and request handling, shared by the program and its fuzzer. */
#ifndef PINION_KEEPER_H
#define PINION_KEEPER_H

#include <stddef.h>

#define MAX_MESSAGE (64 * 1024)
#define MAX_HELD 8192         /* 3 listeners a pod: ~2,700 pods, far beyond a node's 110 */
#define MAX_CLIENTS 16
#define FDS_PER_MESSAGE 64    /* SCM_MAX_FD is 253 */
#define MAX_FDS_IN 4          /* a request carries at most one; more are closed on receipt */
#define MAX_KEY 200

struct held { char key[MAX_KEY + 1]; int fd; };
struct store { struct held *items; size_t count, max; };

struct store *store_new(size_t max_held);
void store_free(struct store *s);
int store_hold(struct store *s, const char *key, int fd);
int valid_key(const char *key, size_t len);
int handle_request(struct store *s, int client, const char *message, size_t len, int truncated,
                   int *fds, int nfds, char *reply, size_t reply_size);

#endif
