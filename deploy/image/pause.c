/* The pod sandbox's first process: holds the pod's namespaces, reaps orphans, exits on
 * SIGINT/SIGTERM. What Kubernetes' pause does, for a pause image made here rather than pulled
 * (no registry): built static, so the image is this one file. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) { _exit(signal_number == SIGINT || signal_number == SIGTERM ? 0 : 1); }

static void reap(int signal_number) {
    (void)signal_number;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    if (getpid() != 1) {
        static const char warning[] = "pause: should be the first process of the sandbox\n";
        (void)!write(2, warning, sizeof warning - 1);
    }
    struct sigaction on_stop = {.sa_handler = stop};
    struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &on_stop, NULL) < 0 || sigaction(SIGTERM, &on_stop, NULL) < 0 ||
        sigaction(SIGCHLD, &on_child, NULL) < 0)
        return 1;
    for (;;)
        pause();
}
