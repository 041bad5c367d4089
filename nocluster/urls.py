from django.contrib import admin
from django.urls import path

from nocluster.admin_views import admin_urls

urlpatterns = [*admin_urls(), path("admin/", admin.site.urls)]
