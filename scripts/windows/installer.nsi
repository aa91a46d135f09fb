; The Windows installer for CIS2 Agent, built on Linux with Debian's makensis by
; scripts/windows/build-installer (which passes the defines below). Per-machine, into Program Files.
;
; Command line (an NSIS installer's own switches, and ours):
;   /S               silent (SCCM, Intune): no pages, no questions
;   /AUTOSTART       also tick "Start at sign-in" (the desktop app starts in the tray at every user's sign-in)
;   /AUTOSTART=0     untick it (without either, an upgrade keeps what the installed version had)
;   /D=C:\path       another install folder (NSIS's own switch: last on the line, no quotes)
; The uninstaller (registered in Add/Remove Programs) takes /S too.
;
; Machine-wide config, %ProgramData%\cis2-agent\config.toml, belongs to the admin (Group Policy, Intune):
; no install writes it and no uninstall removes it. Each user's data (%LOCALAPPDATA%\cis2-agent) and key
; (Credential Manager) are theirs: the uninstaller, run as an admin, leaves them too.

!macro Need NAME
  !ifndef ${NAME}
    !error "${NAME} is not defined: build with scripts/windows/build-installer"
  !endif
!macroend
!insertmacro Need VERSION
!insertmacro Need BIN
!insertmacro Need WEBVIEW2_LOADER
!insertmacro Need ICON
!insertmacro Need OUTFILE

; A 64-bit installer: the programs are x86-64 only, and Debian's wine64 runs 64-bit programs only.
Target amd64-unicode
!ifdef QUICK
  ; The tests' debug build: some 200 MB that LZMA takes 2 minutes over on a 2-core machine; stored as it is.
  SetCompress off
!else
  SetCompressor /SOLID lzma
!endif
RequestExecutionLevel admin
ManifestDPIAware true

!define PRODUCT "CIS2 Agent"
!define PUBLISHER "cis2-agent"
!define UNINSTALL_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\${PRODUCT}"
!define RUN_KEY "Software\Microsoft\Windows\CurrentVersion\Run"

Name "${PRODUCT}"
OutFile "${OUTFILE}"
InstallDir "$PROGRAMFILES64\${PRODUCT}"
; A reinstall or upgrade goes where the last one went, even one installed with /D.
InstallDirRegKey HKLM "${UNINSTALL_KEY}" "InstallLocation"
BrandingText "${PRODUCT} ${VERSION}"

VIProductVersion "${VERSION}.0"
VIAddVersionKey "ProductName" "${PRODUCT}"
VIAddVersionKey "ProductVersion" "${VERSION}"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "FileDescription" "${PRODUCT} installer"
VIAddVersionKey "LegalCopyright" "MIT OR Apache-2.0"

!include MUI2.nsh
!include FileFunc.nsh
!include LogicLib.nsh
!include Sections.nsh

!define MUI_ICON "${ICON}"
!define MUI_UNICON "${ICON}"
!define MUI_ABORTWARNING
!define MUI_FINISHPAGE_NOAUTOCLOSE

!insertmacro MUI_PAGE_DIRECTORY
!insertmacro MUI_PAGE_COMPONENTS
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES
!insertmacro MUI_LANGUAGE "English"

; A running agent holds its .exe open; Windows refuses to replace or delete it. Stopped for every user:
; the installer runs as an admin (SCCM, Intune) when nobody should be mid-sign-in anyway.
!macro StopRunning
  nsExec::Exec 'taskkill /F /IM cis2-agent.exe'
  Pop $0
  nsExec::Exec 'taskkill /F /IM cis2-agentd.exe'
  Pop $0
!macroend

Section "CIS2 Agent (required)" SecMain
  SectionIn RO
  SetShellVarContext all
  !insertmacro StopRunning
  SetOutPath "$INSTDIR"
  File "${BIN}/cis2-agent.exe"
  ; The loader of Microsoft's WebView2 runtime, which draws the window; Windows 10/11 ship the runtime.
  File "${WEBVIEW2_LOADER}"
  File "${BIN}/cis2-agentd.exe"
  File "${BIN}/cis2ctl.exe"
  WriteUninstaller "$INSTDIR\uninstall.exe"

  CreateShortcut "$SMPROGRAMS\${PRODUCT}.lnk" "$INSTDIR\cis2-agent.exe" "" "$INSTDIR\cis2-agent.exe" 0

  ; Only the folder (with "all", $APPDATA is %ProgramData%): the config in it is the admin's to write.
  CreateDirectory "$APPDATA\cis2-agent"

  WriteRegStr HKLM "${UNINSTALL_KEY}" "DisplayName" "${PRODUCT}"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "Publisher" "${PUBLISHER}"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "DisplayIcon" "$INSTDIR\cis2-agent.exe"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "UninstallString" '"$INSTDIR\uninstall.exe"'
  WriteRegStr HKLM "${UNINSTALL_KEY}" "QuietUninstallString" '"$INSTDIR\uninstall.exe" /S'
  WriteRegDWORD HKLM "${UNINSTALL_KEY}" "NoModify" 1
  WriteRegDWORD HKLM "${UNINSTALL_KEY}" "NoRepair" 1
  ${GetSize} "$INSTDIR" "/S=0K" $0 $1 $2
  WriteRegDWORD HKLM "${UNINSTALL_KEY}" "EstimatedSize" $0
SectionEnd

; The machine-wide Run entry starts the app in the tray (window closed) at every user's sign-in. Off on a
; first install unless ticked or /AUTOSTART; an upgrade keeps the installed choice unless told
; (/AUTOSTART, /AUTOSTART=0), so that an SCCM upgrade with plain /S changes nothing an admin set.
Section /o "Start at sign-in for every user" SecAutostart
  WriteRegStr HKLM "${RUN_KEY}" "${PRODUCT}" '"$INSTDIR\cis2-agent.exe" --minimized'
SectionEnd

Section "-autostart off"
  ${IfNot} ${SectionIsSelected} ${SecAutostart}
    DeleteRegValue HKLM "${RUN_KEY}" "${PRODUCT}"
  ${EndIf}
SectionEnd

!insertmacro MUI_FUNCTION_DESCRIPTION_BEGIN
  !insertmacro MUI_DESCRIPTION_TEXT ${SecMain} "The desktop app (tray and sign-in window), cis2-agentd and cis2ctl."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecAutostart} "Start CIS2 Agent in the tray when anyone signs in to this computer (command line: /AUTOSTART, or /AUTOSTART=0 for off)."
!insertmacro MUI_FUNCTION_DESCRIPTION_END

Function .onInit
  SetRegView 64
  ClearErrors
  ReadRegStr $R1 HKLM "${RUN_KEY}" "${PRODUCT}"
  ${IfNot} ${Errors}
    !insertmacro SelectSection ${SecAutostart}
  ${EndIf}
  ${GetParameters} $R0
  ClearErrors
  ${GetOptions} "$R0" "/AUTOSTART" $R1
  ${IfNot} ${Errors}
    ${If} $R1 == "=0"
      !insertmacro UnselectSection ${SecAutostart}
    ${Else}
      !insertmacro SelectSection ${SecAutostart}
    ${EndIf}
  ${EndIf}
FunctionEnd

Function un.onInit
  SetRegView 64
FunctionEnd

Section "Uninstall"
  SetShellVarContext all
  !insertmacro StopRunning
  Delete /REBOOTOK "$INSTDIR\cis2-agent.exe"
  Delete /REBOOTOK "$INSTDIR\WebView2Loader.dll"
  Delete /REBOOTOK "$INSTDIR\cis2-agentd.exe"
  Delete /REBOOTOK "$INSTDIR\cis2ctl.exe"
  Delete "$INSTDIR\uninstall.exe"
  ; Not /r: only what we installed goes, and the folder only if nothing else is in it.
  RMDir /REBOOTOK "$INSTDIR"
  Delete "$SMPROGRAMS\${PRODUCT}.lnk"
  DeleteRegValue HKLM "${RUN_KEY}" "${PRODUCT}"
  DeleteRegKey HKLM "${UNINSTALL_KEY}"
  ; %ProgramData%\cis2-agent (the admin's config) stays.
SectionEnd
