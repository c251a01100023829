/* libFuzzer harness for pinion-cni's parsers of untrusted bytes (`make fuzz-cni`).
 *
 * Input: byte 0 picks what the rest is. 0: a network config on stdin (parsed, validated, and
 * the agent request built from it, prevResult passed through); 1: an agent's reply line;
 * 2: CNI_ARGS and CNI_CONTAINERID (split at the first NUL) with a fixed config. Checked
 * every time: every JSON text we produce (request, prevResult pass-through, a reply's
 * details) parses again with our own strict reader, and every failure has a code and a
 * message. ASan/UBSan catch the rest. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cnicore.h"

static const char FIXED_CONFIG[] =
    "{\"cniVersion\":\"1.0.0\",\"type\":\"pinion-cni\",\"prevResult\":{\"ips\":"
    "[{\"address\":\"10.42.0.5/24\",\"gateway\":\"10.42.0.1\"}]}}";

struct environment { const char *args, *container; };

static const char *lookup(const char *name, void *context) {
    const struct environment *env = context;
    if (strcmp(name, "CNI_COMMAND") == 0) return "ADD";
    if (strcmp(name, "CNI_CONTAINERID") == 0) return env->container;
    if (strcmp(name, "CNI_NETNS") == 0) return "/var/run/netns/cni-1";
    if (strcmp(name, "CNI_IFNAME") == 0) return "eth0";
    if (strcmp(name, "CNI_ARGS") == 0) return env->args;
    return NULL;
}

static void assert_json(const struct buf *text) {
    struct json_doc doc;
    struct buf why = {0};
    assert(!text->failed);
    assert(json_parse(&doc, text->data ? text->data : "", text->len, &why) == JSON_OK);
    json_free(&doc);
    buf_free(&why);
}

static void assert_error(struct cni_error *error) {
    assert(error->code[0] != '\0');
    assert(error->msg.len > 0);
}

static void config_case(const char *config, size_t len, const struct environment *env) {
    struct json_doc doc;
    struct netconf conf;
    struct invocation invocation;
    struct cni_error error = {0};
    memset(&conf, 0, sizeof conf);
    memset(&invocation, 0, sizeof invocation);
    if (cni_decode_config(&doc, config, len, &error) != 0) {
        assert_error(&error);
    } else {
        (void)cni_error_version(&doc);
        if (cni_parse_netconf(&doc, &conf, &error) != 0 ||
            cni_read_invocation(lookup, (void *)env, &invocation, &error) != 0 ||
            cni_require_prev_result(&invocation, &conf, &error) != 0) {
            assert_error(&error);
        } else {
            struct buf request = {0}, passed = {0};
            if (cni_build_request(&invocation, &conf, &doc, &request, &error) == 0) {
                assert_json(&request);
                json_compact(&passed, &doc, conf.prev_result);
                assert_json(&passed);
            } else {
                assert_error(&error);
            }
            buf_free(&request);
            buf_free(&passed);
        }
    }
    netconf_free(&conf);
    invocation_free(&invocation);
    json_free(&doc);
    cni_error_free(&error);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *rest = (const char *)data + 1;
    size_t len = size - 1;
    if (data[0] % 3 == 0) {
        struct environment env = {"K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart", "c0ffee01"};
        config_case(rest, len, &env);
    } else if (data[0] % 3 == 1) {
        struct cni_error error = {0};
        if (cni_check_reply(rest, len, "/run/pinion/cni.sock", &error) != 0) {
            assert_error(&error);
            struct buf details = {0};
            py_dumps_str(&details, error.details.data ? error.details.data : "", error.details.len);
            assert_json(&details);
            buf_free(&details);
        }
        cni_error_free(&error);
    } else {
        char *copy = malloc(len + 2); /* two NUL-terminated strings: args, then container id */
        memcpy(copy, rest, len);
        copy[len] = copy[len + 1] = '\0';
        size_t first = strlen(copy);
        struct environment env = {copy, first < len ? copy + first + 1 : "c0ffee01"};
        config_case(FIXED_CONFIG, sizeof FIXED_CONFIG - 1, &env);
        free(copy);
    }
    return 0;
}
