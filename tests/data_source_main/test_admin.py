"""Changes made in the admin are announced like the plugin's own, so registries follow renames and deletions."""

from __future__ import annotations

from django.contrib.admin.sites import site
from django.test import RequestFactory

from nocluster import app
from plugins.data_source_main.models import Collection


def test_renaming_and_deleting_a_collection_in_the_admin_updates_the_registry(committing_postgres: None) -> None:
    plugin = app.plugins["data_source_main"]
    Collection.objects.create(name="old_name")
    plugin.registry.reload()
    model_admin = site._registry[Collection]
    request = RequestFactory().post("/admin/")

    # When the collection is renamed in the admin
    collection = Collection.objects.get(name="old_name")
    collection.name = "new_name"
    model_admin.save_model(request, collection, form=None, change=True)

    # Then the registry has the new name only, and equals the database
    assert plugin.registry.get("old_name") is None and plugin.registry.get("new_name") is not None
    assert plugin.in_sync()

    # And a deletion in the admin removes it
    model_admin.delete_model(request, collection)
    assert plugin.registry.get("new_name") is None and plugin.in_sync()
