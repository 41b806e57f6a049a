/* Shared helpers for the tests. */
#ifndef PP_TEST_HELPERS_H
#define PP_TEST_HELPERS_H

int count_fds(void);                          /* open fds of this process */
int count_children(void);                     /* direct children of this process */
int count_threads(void);                      /* threads of this process */
int count_mappings_named(const char *needle); /* lines of /proc/self/maps naming it */

#endif
