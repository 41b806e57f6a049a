/*
 * fnref: code addresses as (loaded object, offset). See fnref.h.
 */
#include "fnref.h"

#include "procpool.h"

#include <dlfcn.h>
#include <link.h>
#include <string.h>

#define PP_FNREF_CACHE 8

struct cached_object {
    char name[PATH_MAX];
    struct link_map *map;
};

static struct cached_object cache[PP_FNREF_CACHE];
static unsigned cache_next;

int pp__fnref_encode(const void *addr, struct pp_fnref *ref)
{
    Dl_info info;
    struct link_map *map = NULL;
    if (!addr || !dladdr1(addr, &info, (void **)&map, RTLD_DL_LINKMAP) || !map)
        return PP_ENOTFOUND;
    size_t len = strlen(map->l_name);
    if (len >= sizeof ref->object)
        return PP_ENOTFOUND;
    memcpy(ref->object, map->l_name, len + 1);
    ref->offset = (uint64_t)((uintptr_t)addr - (uintptr_t)map->l_addr);
    return 0;
}

/* The link map of the object called `name`, loading it if needed. The
 * handle is kept for the life of the process, as the code it names may run
 * at any time. */
static struct link_map *find_object(const char *name)
{
    for (unsigned i = 0; i < PP_FNREF_CACHE; i++)
        if (cache[i].map && strcmp(cache[i].name, name) == 0)
            return cache[i].map;
    void *handle = dlopen(name[0] ? name : NULL, RTLD_NOW | RTLD_NOLOAD);
    if (!handle && name[0])
        handle = dlopen(name, RTLD_NOW);
    struct link_map *map = NULL;
    if (!handle || dlinfo(handle, RTLD_DI_LINKMAP, &map) != 0 || !map)
        return NULL;
    struct cached_object *slot = &cache[cache_next++ % PP_FNREF_CACHE];
    strcpy(slot->name, name); /* fits: both are PATH_MAX and name ends in it */
    slot->map = map;
    return map;
}

void *pp__fnref_resolve(const struct pp_fnref *ref)
{
    if (!memchr(ref->object, '\0', sizeof ref->object))
        return NULL;
    struct link_map *map = find_object(ref->object);
    if (!map)
        return NULL;
    void *addr = (void *)((uintptr_t)map->l_addr + (uintptr_t)ref->offset);
    /* The offset came from elsewhere: it must land inside the same object. */
    Dl_info info;
    struct link_map *found = NULL;
    if (!dladdr1(addr, &info, (void **)&found, RTLD_DL_LINKMAP) || found != map)
        return NULL;
    return addr;
}
